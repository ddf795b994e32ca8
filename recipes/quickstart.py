"""Quickstart: train a small Llama on the Python standard library's source, on a CPU, in minutes.

    fastllm train recipes/quickstart.py                 # about a minute on 2 idle cores
    fastllm train recipes/quickstart.py train.steps=50  # a quicker look

Before training, :func:`before_train` writes a deterministic selection of stdlib ``.py`` files as
the corpus, trains a byte-level BPE tokenizer on it and tokenizes it into ``<run.dir>/data``
(nothing is downloaded). After training the run is exported to Hugging Face format
(``<run.dir>/hf``), a sample is printed, and :func:`after_train` compares the final validation loss
with the unigram entropy of the data: the loss of the best model that ignores context.
"""

import dataclasses
from pathlib import Path

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, SampleSection, TrainSection
from fastllm.train.quickstart import prepare_quickstart, unigram_entropy

CORPUS_BYTES = 3_000_000  # of stdlib source
VOCAB_SIZE = 2048


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/quickstart", export_hf=True),
        model=ModelSection(
            preset="tiny-llama", vocab_size=VOCAB_SIZE, embed_dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
            mlp_dim=384, max_seq_len=256, tie_embeddings=True,
        ),
        data=DataConfig(datasets=("runs/quickstart/data/tokens",), seq_len=128, validation_fraction=0.02, prefetch=2),
        # 450 steps: about a minute on 2 idle cores, so a machine shared with another job still
        # finishes within 3 minutes; the loss ends ~1.6 nats below the unigram entropy
        train=TrainSection(steps=450, batch_size=16, log_every=10, eval_every=150, eval_batches=8,
                           checkpoint_every=150),
        optim=OptimSection(lr=3e-3, warmup_steps=20, weight_decay=0.1, min_lr_ratio=0.1),
        sample=SampleSection(prompt="def __init__(self, ", max_new_tokens=80, temperature=0.7, top_k=50),
    )


def before_train(config: Config) -> Config:
    vocab = config.model_config.vocab_size
    tokens, _ = prepare_quickstart(Path(config.run.dir) / "data", max_bytes=CORPUS_BYTES, vocab_size=vocab)
    print(f"quickstart data: stdlib source tokenized into {tokens}")
    return dataclasses.replace(config, data=config.data.replace(datasets=(str(tokens),)))


def after_train(config: Config, result) -> None:
    entropy = unigram_entropy(config.data.datasets[0].path)
    loss = result.val_loss if result.val_loss is not None else result.final_loss
    print(f"unigram entropy of the data: {entropy:.3f} nats/token; final validation loss: {loss:.3f}")
    if not loss < entropy:
        raise SystemExit("quickstart: the loss did not fall below the unigram entropy")
