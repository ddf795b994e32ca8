"""SmolLM2-135M (a 30-layer Llama with tied embeddings) pre-training on your prepared data.

    fastllm prepare my_corpus/ --tokenizer HuggingFaceTB-SmolLM2-135M/ --output data/smollm2
    fastllm train recipes/smollm2_135m.py data.datasets=data/smollm2

Fits one GPU: bf16 compute over fp32 master weights, 8 x 2048-token micro-batches, 4-step accumulation
(64k tokens per step).
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/smollm2_135m"),
        model=ModelSection(preset="smollm2-135m"),
        data=DataConfig(datasets=("data/smollm2",), seq_len=2048, validation_fraction=0.001),
        train=TrainSection(steps=20_000, batch_size=32, micro_batch_size=8, precision="bf16", log_every=10,
                           eval_every=1000, checkpoint_every=1000),
        optim=OptimSection(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=1000, schedule="cosine"),
    )
