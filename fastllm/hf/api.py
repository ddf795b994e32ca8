"""Hugging Face checkpoints in and out, and conversion between them and fastllm's own format.

    config, params = fastllm.hf.load("path/to/hf-checkpoint")
    fastllm.hf.save(config, params, "out/", tokenizer="path/to/tokenizer.json")
    fastllm.hf.convert("hf-dir", "fastllm-dir")        # and back with to="hf"
    fastllm.hf.convert("runs/quickstart", "hf-out")    # any format fastllm writes (see formats.py)

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
from fastllm.errors import UserError
from fastllm.hf import checkpoint, formats, rules
from fastllm.hf.families import Family, by_family, by_model_type
from fastllm.models import serialize
from fastllm.models.config import ModelConfig

__all__ = ["load", "save", "convert", "load_config", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


def _hf_config_class(family: Family):
    import transformers

    return getattr(transformers, family.config_class)


def _check_types(raw: dict, defaults, source: str) -> None:
    """Each value of config.json has the type of transformers' default for it (ints stand for
    floats), so a mistyped field is named here rather than failing as arithmetic on a string."""
    for key, value in raw.items():
        default = getattr(defaults, key, None)
        expected = (int, float) if type(default) is float else type(default)
        if value is None or default is None or key.endswith("token_id"):
            continue  # null means "unset"; token ids may be lists (several EOS)
        if expected not in (bool, int, float, str, (int, float)):
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise UserError(f"{source}: {key} must be a {type(default).__name__} (like {default!r}), got {value!r}")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory (config.json only)."""
    raw = checkpoint.read_config(path)
    family = by_model_type(raw, f"{path}/config.json")
    config_class = _hf_config_class(family)
    if "dtype" in raw:
        raw.pop("torch_dtype", None)  # the legacy twin save() writes; transformers warns when it reads it
    _check_types(raw, config_class(), f"{path}/config.json")
    return family.mapping.config_from_hf(config_class.from_dict(raw), family.family)


def _canonical_names(reader: checkpoint.SafetensorsReader, family: Family) -> dict[str, str]:
    """{canonical name: stored name}: bare base-model checkpoints (``h.0...``) get the base prefix."""
    names = {}
    for stored in reader.names():
        canonical = stored
        if not stored.startswith((family.base_prefix, "lm_head.")):
            canonical = family.base_prefix + stored
        names[canonical] = stored
    return names


def load(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = torch.float32,
         device: torch.device | str = "cpu") -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a Hugging Face checkpoint directory with safetensors weights;
    ``dtype=None`` keeps the stored dtypes."""
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


def _write_configs(config: ModelConfig, family: Family, dtype: torch.dtype, path: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    fields = family.mapping.config_to_hf(config)
    hf_config = _hf_config_class(family)(**fields, architectures=[family.architecture], dtype=dtype,
                                         bos_token_id=ids.get("bos_token"), eos_token_id=ids.get("eos_token"),
                                         pad_token_id=None)
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


def _specials(config: ModelConfig, tokenizer, eos_token: Optional[str]) -> dict[str, tuple[str, int]]:
    """The tokenizer's bos/eos (token, id), refused when its ids do not fit the model's vocabulary."""
    from fastllm.data.tokenizer import read_tokenizer, special_tokens, vocab_size

    if tokenizer is None:
        return {}
    backend = tokenizer if not isinstance(tokenizer, (str, os.PathLike)) else read_tokenizer(tokenizer)
    if vocab_size(backend) > config.vocab_size:
        raise UserError(f"tokenizer {tokenizer}: {vocab_size(backend)} ids do not fit the model's "
                        f"vocab_size={config.vocab_size}; it belongs to another model")
    return special_tokens(tokenizer, eos_token)


def save(config: ModelConfig, params, path: str | os.PathLike, *, tokenizer=None, eos_token: Optional[str] = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """A Hugging Face checkpoint of ``config.family`` that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes config.json, generation_config.json, safetensors (sharded with an index beyond
    ``max_shard_bytes``; a tied head is not stored) and, given ``tokenizer`` (a
    ``tokenizers.Tokenizer``, a tokenizer.json path or a directory), tokenizer.json and
    tokenizer_config.json. The tokenizer's BOS/EOS (``eos_token`` if given: the one training
    appended) go into all three configs as ids and tokens. The directory is assembled beside
    ``path`` and renamed into place.
    """
    family = by_family(config.family)
    flat = tree.flatten(params)
    serialize.check_params(config, flat, "save")
    tensors = rules.save_tensors(family.mapping.rules(config), flat, f"save({config.family})")
    specials = _specials(config, tokenizer, eos_token)
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_configs(config, family, _params_dtype(flat), staging, {k: i for k, (_, i) in specials.items()})
        checkpoint.write_safetensors(tensors, staging, max_shard_bytes)
        if tokenizer is not None:
            checkpoint.write_tokenizer(tokenizer, staging, {k: token for k, (token, _) in specials.items()})
        if path.exists():
            path.rmdir()
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_destination(dst: Path) -> None:
    """Before any work: a conversion never replaces or mixes into something already there."""
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise FileExistsError(f"{dst}: already exists and is not an empty directory; the destination of a "
                              "conversion must be new (nothing there is overwritten)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: Optional[str] = None,
            dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert a model to the format ``to`` ("hf" or "fastllm") in the new directory ``dst``; returns
    the format written.

    ``src`` is any format :func:`fastllm.hf.load_any` reads (a run directory, a training
    checkpoint, a fastllm or Hugging Face directory). ``to`` defaults to "fastllm" for a Hugging
    Face source and "hf" otherwise; ``dtype`` casts the weights (default: keep). The tokenizer and
    generation files beside the weights are carried along. ``dst`` must not exist (or be empty); it
    appears complete or not at all.
    """
    src, dst = Path(src), Path(dst)
    if to not in (None, "hf", "fastllm"):
        raise UserError(f"to must be 'hf' or 'fastllm', got {to!r}")
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    _check_destination(dst)
    loaded = formats.load_any(src, dtype=dtype)
    to = to or ("fastllm" if loaded.format == "hf" else "hf")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        _write(loaded, to, staging / "out", max_shard_bytes)
        _check_destination(dst)  # still free after the (possibly long) conversion
        if dst.exists():
            dst.rmdir()
        os.rename(staging / "out", dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


def _write(loaded: formats.Loaded, to: str, out: Path, max_shard_bytes: int) -> None:
    tokenizer = loaded.aux_dir if loaded.aux_dir and (loaded.aux_dir / "tokenizer.json").is_file() else loaded.tokenizer
    if to == "hf":
        save(loaded.config, loaded.params, out, tokenizer=tokenizer, eos_token=loaded.eos_token,
             max_shard_bytes=max_shard_bytes)
    else:
        serialize.save_model(loaded.config, loaded.params, out)
        if tokenizer is not None:
            specials = _specials(loaded.config, tokenizer, loaded.eos_token)
            checkpoint.write_tokenizer(tokenizer, out, {k: token for k, (token, _) in specials.items()})
    if loaded.aux_dir is not None:
        checkpoint.copy_aux_files(loaded.aux_dir, out)
