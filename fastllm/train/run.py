"""``train(config)``: what ``fastllm train`` does, as one Python call.

Runs the Trainer, then (``run.export_hf``) writes a Hugging Face checkpoint to ``<run.dir>/hf`` and
(``sample.prompt``) prints a sample from the trained model. A recipe module may define
``before_train(config) -> config`` (e.g. prepare its data; under torchrun it runs on rank 0 first,
then on the other ranks) and ``after_train(config, result)``.
A recipe may also define ``model(config) -> fastllm.nn.Model`` to train a model of its own.
Under a mesh the state holds shards: rank 0 exports from the last (sharded) checkpoint.

All of it runs inside a :class:`fastllm.train.lifecycle.Session`: the process group, stop signals
and heartbeats of a distributed run are set up here and torn down on every way out. A run that
stops early (a stop signal, with its checkpoint saved; non-finite steps) raises
:class:`fastllm.errors.Stop` with its one-line message and exit status, before any export.
A run that is already complete reports its final metrics from ``metrics.jsonl`` and exports again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Optional

from fastllm import random
from fastllm.errors import Stop
from fastllm.models.config import ModelConfig
from fastllm.train import checkpointing
from fastllm.train.lifecycle import Session, rank_zero_first
from fastllm.train.trainer import Trainer, TrainResult

__all__ = ["train", "export_hf", "sample_text"]


def export_hf(config, params) -> Path:
    """Write ``params`` (whole tensors) to ``<run.dir>/hf`` (replacing an older export), with the
    tokenizer and its bos/eos; returns its path."""
    from fastllm import hf
    from fastllm.data.dataset import recorded_eos

    target = Path(config.run.dir) / "hf"
    if target.exists():
        shutil.rmtree(target)
    tokenizer = Path(config.run.dir) / "tokenizer.json"
    eos = recorded_eos(config.data.datasets[0].path) if config.data.datasets else None  # the EOS training saw
    hf.save(config.model_config, params, target, tokenizer=str(tokenizer) if tokenizer.is_file() else None,
            eos_token=eos)
    return target


def sample_text(model_config, params, tokenizer_file: str | Path, prompt: str, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                seed: int = 0) -> str:
    """Decode ``prompt`` + sampled continuation with a ``tokenizers`` tokenizer.json."""
    import torch
    from tokenizers import Tokenizer

    from fastllm.generate import generate

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [0]
    room = model_config.max_seq_len - max_new_tokens
    ids = ids[-room:] if room > 0 else ids[-1:]
    device = params["embed"]["tokens"].device
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model_config, params, tokens, max_new_tokens=min(max_new_tokens, model_config.max_seq_len - len(ids)),
                   temperature=temperature, top_k=top_k, top_p=top_p, key=random.key(seed))
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def train(config, *, recipe: Optional[ModuleType] = None, model=None, print_fn=print) -> TrainResult:
    """Train ``config`` (with ``recipe``'s hooks, and its ``model(config)`` when it defines one;
    ``model``: an :class:`fastllm.nn.Model` instead), then export and sample as the config says."""
    with Session(config) as session:
        return _train(config, recipe, model, print_fn, session)


def _train(config, recipe: Optional[ModuleType], model, print_fn, session: Session) -> TrainResult:
    if recipe is not None and hasattr(recipe, "before_train"):  # it may prepare data: rank 0 first
        config = rank_zero_first(lambda: recipe.before_train(config) or config)
    if model is None and recipe is not None and hasattr(recipe, "model"):
        model = recipe.model(config)
    builtin = isinstance(config.model_config, ModelConfig)
    if config.run.export_hf and not builtin:
        raise ValueError("run.export_hf: Hugging Face export needs a built-in model family (config.model)")
    trainer = Trainer(config, model=model, signals=session.signals)
    result = trainer.run()
    if result.stopped is not None:
        raise Stop(result.stopped.message, result.stopped.code, speaker=trainer.is_main)
    if not trainer.is_main:
        return result
    if not result.history:
        print_fn(f"{config.run.dir} is already trained to step {result.state.step} (train.steps)")
    sharded = trainer.mesh.world_size > 1
    where = f" (sharded over {trainer.mesh.world_size} ranks; checkpoints in {config.run.dir}/checkpoints)"
    print_fn(f"step {result.state.step}: loss {result.final_loss:.4f}"
             + ("" if result.val_loss is None else f", validation loss {result.val_loss:.4f}")
             + (where if sharded else ""))
    if config.run.export_hf:
        # Under a mesh the run ends with a save, a collective that returns on every rank once the
        # checkpoint is complete: rank 0 assembles the whole tensors in this process.
        params = checkpointing.load_model(checkpointing.latest(config.run.dir))[1] if sharded else result.state.params
        print_fn(f"exported a Hugging Face checkpoint to {export_hf(config, params)}")
    tokenizer = Path(config.run.dir) / "tokenizer.json"
    s = config.sample
    # Under a mesh no sample: decoding needs the whole model on one device, which a sharded run may
    # not have room for, while the other ranks idle. `fastllm generate <run.dir>` samples from it.
    if builtin and not sharded and s.prompt and s.max_new_tokens and tokenizer.is_file():
        text = sample_text(config.model_config, result.state.params, tokenizer, s.prompt,
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                           top_p=s.top_p, seed=config.run.seed)
        print_fn(f"--- sample ---\n{text}\n--------------")
    if recipe is not None and hasattr(recipe, "after_train"):
        recipe.after_train(config, result)
    return result
