"""Loading a training recipe: :func:`fastllm.config.load_recipe`, checked to build a training config."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import ModuleType

from fastllm.config import load_recipe
from fastllm.errors import UserError
from fastllm.train.config import Config

__all__ = ["load_train_recipe"]


def load_train_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> tuple[ModuleType, Config]:
    """(recipe module, its :class:`Config` with ``overrides`` applied); a UserError when the
    recipe's ``config()`` builds something else."""
    recipe, config = load_recipe(path, overrides)
    if not isinstance(config, Config):
        raise UserError(f"recipe {path}: config() returned a {type(config).__name__}, expected a "
                        "fastllm.train.Config")
    return recipe, config
