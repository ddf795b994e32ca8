"""Continued pre-training: start from a Hugging Face checkpoint's weights and train on your data.

    fastllm prepare my_corpus/ --tokenizer checkpoints/base --output data/continued
    fastllm train recipes/continued_pretraining.py run.init_from=checkpoints/base data.datasets=data/continued

``run.init_from`` is any model directory fastllm reads (Hugging Face, fastllm, a run, a
checkpoint); :func:`before_train` takes the model's shape from it, so the config's model section
only stands in until then. The data must be tokenized with the checkpoint's own tokenizer. The
learning rate is low and warms up: the weights are trained already.
"""

import dataclasses

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/continued", init_from="checkpoints/base", export_hf=True),
        model=ModelSection(preset="smollm2-135m"),  # replaced by the checkpoint's own shape
        data=DataConfig(datasets=("data/continued",), seq_len=1024, validation_fraction=0.01),
        train=TrainSection(steps=2000, batch_size=32, log_every=10, eval_every=500, checkpoint_every=500),
        optim=OptimSection(lr=1e-4, warmup_steps=100, weight_decay=0.1, schedule="cosine"),
    )


def before_train(config: Config) -> Config:
    """The model section becomes the checkpoint's own config (its family, shape and vocabulary)."""
    from fastllm.train.warm_start import model_section_of

    return dataclasses.replace(config, model=model_section_of(config.run.init_from))
