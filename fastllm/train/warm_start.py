"""Starting a run from a trained model's weights (``run.init_from``): continued pre-training or
fine-tuning of a Hugging Face checkpoint, a fastllm model or another run.

The weights are read whole on each rank (:func:`fastllm.hf.load_any`, any format), checked
against the parameters the config's model declares, and each rank copies its own shard of every
parameter into the freshly initialised state, so the optimizer state that was built for it stays
valid (Adam's moments start at zero either way). A resumed run reads its checkpoint instead.
"""

from __future__ import annotations

from typing import Any

import torch

from fastllm import nn, tree
from fastllm.errors import UserError
from fastllm.sharding import Mesh, is_spec, shard

__all__ = ["copy_initial_params", "model_section_of"]


def copy_initial_params(params: Any, source: str, plan: Any, mesh: Mesh) -> None:
    """Overwrite this rank's shards ``params`` (laid out by ``plan.params``) with ``source``'s weights."""
    from fastllm import hf

    loaded = tree.flatten(hf.load_any(source, dtype=torch.float32).params)
    declared = tree.flatten(plan.declarations, is_leaf=nn.is_param)
    missing, extra = sorted(set(declared) - set(loaded)), sorted(set(loaded) - set(declared))
    if missing or extra:
        raise UserError(f"run.init_from={source}: its parameters differ from the config's model (missing "
                        f"{missing[:3]}, unexpected {extra[:3]}); set the model section to the checkpoint's shape")
    for path, param in declared.items():
        if tuple(loaded[path].shape) != tuple(param.shape):
            raise UserError(f"run.init_from={source}: {path} has shape {tuple(loaded[path].shape)}, the config's "
                            f"model declares {tuple(param.shape)}")
    specs = tree.flatten(plan.params, is_leaf=is_spec)
    with torch.no_grad():
        for path, target in tree.flatten(params).items():
            target.copy_(shard(loaded[path], specs[path], mesh, name=path))


def model_section_of(source: str) -> Any:
    """A config's model section describing ``source``'s model (any model directory fastllm reads):
    every field set from its saved config, so the section resolves to exactly that model."""
    from fastllm import hf
    from fastllm.config import from_dict, to_dict
    from fastllm.train.config import ModelSection

    return from_dict(ModelSection, to_dict(hf.load_any(source).config))
