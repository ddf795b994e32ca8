"""Supervised fine-tuning with loss masks: train on the responses of prompt/response pairs only.

    fastllm prepare sft.jsonl --tokenizer checkpoints/base --output data/sft \\
        --prompt-field prompt --response-field response
    fastllm train recipes/sft.py run.init_from=checkpoints/base data.datasets=data/sft

``prepare`` stores a loss mask with each document (``prompt + response + EOS``): the prompt's
tokens are never targets, so the loss and its gradient come from the response alone.
``data.mask_cross_document_loss`` keeps a packed row's next document from being predicted from
the previous one. Like continued pre-training, the model's shape comes from ``run.init_from``.
"""

import dataclasses

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/sft", init_from="checkpoints/base", export_hf=True),
        model=ModelSection(preset="smollm2-135m"),  # replaced by the checkpoint's own shape
        data=DataConfig(datasets=("data/sft",), seq_len=1024, validation_fraction=0.02,
                        mask_cross_document_loss=True),
        train=TrainSection(steps=1000, batch_size=16, log_every=10, eval_every=250, checkpoint_every=250),
        optim=OptimSection(lr=2e-5, warmup_steps=50, weight_decay=0.0, schedule="cosine"),
    )


def before_train(config: Config) -> Config:
    from fastllm.train.warm_start import model_section_of

    return dataclasses.replace(config, model=model_section_of(config.run.init_from))
