"""Hugging Face checkpoints in and out, and conversion between them and fastllm's own format.

    config, params = fastllm.hf.load("path/to/hf-checkpoint")
    fastllm.hf.save(config, params, "out/", tokenizer="path/to/tokenizer.json")
    fastllm.hf.convert("hf-dir", "fastllm-dir")        # and back with to="hf"

The config goes through transformers' own config class (defaults, legacy ``rope_scaling``, Qwen2's
``layer_types``), never through remote code; weights only through safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fastllm import tree
from fastllm.hf import checkpoint, rules
from fastllm.hf.families import Family, by_family, by_model_type
from fastllm.models import serialize
from fastllm.models.config import ModelConfig

__all__ = ["load", "save", "convert", "load_config", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


def _hf_config_class(family: Family):
    import transformers

    return getattr(transformers, family.config_class)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory (config.json only)."""
    raw = checkpoint.read_config(path)
    family = by_model_type(raw, f"{path}/config.json")
    hf_config = _hf_config_class(family).from_dict(raw)
    return family.mapping.config_from_hf(hf_config, family.family)


def _canonical_names(reader: checkpoint.SafetensorsReader, family: Family) -> dict[str, str]:
    """{canonical name: stored name}: bare base-model checkpoints (``h.0...``) get the base prefix."""
    names = {}
    for stored in reader.names():
        canonical = stored
        if not stored.startswith((family.base_prefix, "lm_head.")):
            canonical = family.base_prefix + stored
        names[canonical] = stored
    return names


def load(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a Hugging Face checkpoint directory with safetensors weights."""
    config = load_config(path)
    family = by_family(config.family)
    reader = checkpoint.SafetensorsReader(path)
    stored = _canonical_names(reader, family)
    weight_rules = family.mapping.rules(config, frozenset(stored))
    flat = rules.load_tensors(
        weight_rules,
        get=lambda name: reader.get(stored[name]).to(device=device, dtype=dtype),
        available=set(stored),
        ignored=lambda name: family.mapping.is_ignored(name, config),
        source=str(path),
    )
    flat = {name: t.contiguous() for name, t in flat.items()}
    serialize.check_params(config, flat, str(path))
    return config, tree.unflatten(flat)


def _params_dtype(flat: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in flat.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _write_configs(config: ModelConfig, family: Family, dtype: torch.dtype, path: Path) -> None:
    from transformers import GenerationConfig

    fields = family.mapping.config_to_hf(config)
    hf_config = _hf_config_class(family)(**fields, architectures=[family.architecture], dtype=dtype,
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_config.save_pretrained(path)
    _add_legacy_fields(path / "config.json", dtype, fields.get("rope_parameters"))
    GenerationConfig.from_model_config(hf_config).save_pretrained(path)


def _add_legacy_fields(config_path: Path, dtype: torch.dtype, rope: Optional[dict]) -> None:
    """transformers 4 reads ``torch_dtype``, ``rope_theta`` and ``rope_scaling`` instead of ``dtype`` and
    ``rope_parameters``; writing both keeps the checkpoint loadable (with the same maths) by either."""
    raw = json.loads(config_path.read_text())
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    if rope is not None:
        raw["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        raw["rope_scaling"] = None if rope["rope_type"] == "default" else {"type": rope["rope_type"], **scaling}
    config_path.write_text(json.dumps(dict(sorted(raw.items())), indent=2) + "\n")


def save(config: ModelConfig, params, path: str | os.PathLike, *, tokenizer=None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """A Hugging Face checkpoint of ``config.family`` that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes config.json, generation_config.json, safetensors (sharded with an index beyond
    ``max_shard_bytes``; a tied head is not stored) and, given ``tokenizer`` (a
    ``tokenizers.Tokenizer``, a tokenizer.json path or a directory), tokenizer.json and
    tokenizer_config.json. The directory is assembled beside ``path`` and renamed into place.
    """
    family = by_family(config.family)
    flat = tree.flatten(params)
    serialize.check_params(config, flat, "save")
    tensors = rules.save_tensors(family.mapping.rules(config), flat, f"save({config.family})")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_configs(config, family, _params_dtype(flat), staging)
        checkpoint.write_safetensors(tensors, staging, max_shard_bytes)
        if tokenizer is not None:
            checkpoint.write_tokenizer(tokenizer, staging)
        if path.exists():
            path.rmdir()
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _detect(path: Path) -> str:
    if serialize.is_model_dir(path):
        return "fastllm"
    if _is_sharded(path):
        return "fastllm-sharded"
    if (path / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(f"{path}: neither a fastllm model ({serialize.CONFIG_FILE}) nor a Hugging Face "
                            "checkpoint (config.json)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: Optional[str] = None,
            dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert a checkpoint directory between the formats ("hf", "fastllm"); returns the format written.

    ``to`` defaults to the other format than ``src``'s; ``dtype`` casts the weights (default: keep).
    Tokenizer and generation files next to the weights are carried along.
    """
    src, dst = Path(src), Path(dst)
    source = _detect(src)
    to = to or ("fastllm" if source == "hf" else "hf")
    if to not in ("hf", "fastllm"):
        raise ValueError(f"to must be 'hf' or 'fastllm', got {to!r}")
    if source == "hf":
        config, params = load(src, dtype=dtype or _stored_dtype(src))
    elif source == "fastllm-sharded":
        config, params = _load_sharded(src, dtype)
    else:
        config, params = serialize.load_model(src, dtype=dtype)
    if to == "hf":
        save(config, params, dst, max_shard_bytes=max_shard_bytes)
    else:
        serialize.save_model(config, params, dst)
    checkpoint.copy_aux_files(src, dst)
    return to


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype the HF checkpoint's tensors are stored in (so a conversion does not silently upcast)."""
    reader = checkpoint.SafetensorsReader(path)
    stored = reader.get(reader.names()[0]).dtype
    return stored if stored.is_floating_point else torch.float32


# --- sharded training checkpoints (added by the sharded-checkpoint owner; see docs/checkpoints.md) ---
def _is_sharded(path: Path) -> bool:
    from fastllm.sharding import checkpoint as sharded

    return sharded.is_sharded(path)


def _load_sharded(path: Path, dtype: Optional[torch.dtype]) -> tuple[ModelConfig, dict]:
    """(config, whole params) of a ``fastllm.sharding.checkpoint`` directory, in one process.

    The model config comes from the checkpoint's metadata: ``"model_config"`` (a ModelConfig as
    ``serialize.config_to_dict`` writes it) or ``"config"`` (a training config dict, as the trainer
    writes it).
    """
    from fastllm.sharding import checkpoint as sharded

    metadata, trees = sharded.load_full(path, names=["params"])
    if "model_config" in metadata:
        config = serialize.config_from_dict(metadata["model_config"])
    elif "config" in metadata:
        from fastllm.config import from_dict
        from fastllm.train.config import Config

        config = from_dict(Config, metadata["config"]).model_config
    else:
        raise ValueError(f"{path}: sharded checkpoint metadata has no 'model_config' or 'config' "
                         f"(it has {sorted(metadata)}); cannot tell the model")
    params = trees["params"]
    if dtype is not None:
        params = tree.map(lambda t: t.to(dtype), params)
    serialize.check_params(config, tree.flatten(params), str(path))
    return config, params
