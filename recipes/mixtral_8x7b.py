"""Mixtral 8x7B (sparse mixture of experts, top-2 of 8) fine-tuning on your prepared data.

    fastllm prepare my_data.jsonl --tokenizer Mixtral-8x7B-v0.1/ --output data/mixtral
    torchrun --nproc-per-node 16 -m fastllm train recipes/mixtral_8x7b.py data.datasets=data/mixtral

47B parameters on 16 GPUs as data=8 x tensor=2:

* expert parallelism (``mesh.rules.experts=data``): data rank ``i`` holds expert ``i`` of every
  layer, and each layer's routed tokens travel to their experts and back by two all-to-alls with
  variable splits (dropless: nothing dropped, nothing padded); the experts' gradients need no sum
  over ``data``, since each expert sees all of its tokens on its one rank;
* tensor parallelism over 2 (the default rules): attention heads, the vocabulary and each expert's
  hidden units (expert tensor parallelism);
* ZeRO-3 over ``data`` for everything else (embeddings, attention, norms, routers: 1.6B
  parameters), gathered block by block.

About 2.9B parameters per GPU (45B of experts / 16, the rest / 16), so with fp32 masters, AdamW
moments and gradients about 44 GiB per GPU before activations; bf16, recomputation, 32 sequences of
4096 tokens per step. The router's load-balancing loss (``model.moe.aux_loss_coef``) is taken over
every token of a micro-batch on all ranks, as on one process. ``fastllm.train.plan.plan_layout``
prints the layout's memory and collectives without GPUs.
"""

from fastllm.data import DataConfig
from fastllm.sharding import COMPUTE_RULES
from fastllm.train.config import Config, MeshSection, ModelSection, OptimSection, RunConfig, TrainSection, ZeroSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/mixtral_8x7b"),
        model=ModelSection(preset="mixtral-8x7b"),
        data=DataConfig(datasets=("data/mixtral",), seq_len=4096, validation_fraction=0.01),
        train=TrainSection(steps=2_000, batch_size=32, micro_batch_size=1, precision="bf16", remat="block",
                           log_every=1, eval_every=200, checkpoint_every=200),
        optim=OptimSection(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=50, min_lr_ratio=0.1),
        mesh=MeshSection(data=8, tensor=2, rules=COMPUTE_RULES.replace("experts", "data").as_mapping()),
        zero=ZeroSection(stage=3),
    )
