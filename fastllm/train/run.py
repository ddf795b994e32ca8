"""``train(config)``: what ``fastllm train`` does, as one Python call.

Runs the Trainer, then (``run.export_hf``) writes a Hugging Face checkpoint to ``<run.dir>/hf`` and
(``sample.prompt``) prints a sample from the trained model. A recipe module may define
``before_train(config) -> config`` (e.g. prepare its data) and ``after_train(config, result)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Optional

from fastllm import random
from fastllm.train.trainer import Trainer, TrainResult

__all__ = ["train", "export_hf", "sample_text"]


def export_hf(config, result: TrainResult) -> Path:
    """Write ``<run.dir>/hf`` (replacing an older export) and return its path."""
    from fastllm import hf

    target = Path(config.run.dir) / "hf"
    if target.exists():
        shutil.rmtree(target)
    tokenizer = Path(config.run.dir) / "tokenizer.json"
    hf.save(config.model_config, result.state.params, target, tokenizer=str(tokenizer) if tokenizer.is_file() else None)
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


def train(config, *, recipe: Optional[ModuleType] = None, print_fn=print) -> TrainResult:
    if recipe is not None and hasattr(recipe, "before_train"):
        config = recipe.before_train(config) or config
    trainer = Trainer(config)
    result = trainer.run()
    if trainer.partitioner is not None:  # partitioner: the state holds shards; export from a checkpoint
        if trainer.is_main:
            print_fn(f"step {result.state.step}: loss {result.final_loss:.4f} (sharded over "
                     f"{trainer.mesh.world_size} ranks; checkpoints in {config.run.dir}/checkpoints)")
        return result
    print_fn(f"step {result.state.step}: loss {result.final_loss:.4f}"
             + ("" if result.val_loss is None else f", validation loss {result.val_loss:.4f}"))
    if config.run.export_hf:
        print_fn(f"exported a Hugging Face checkpoint to {export_hf(config, result)}")
    tokenizer = Path(config.run.dir) / "tokenizer.json"
    s = config.sample
    if s.prompt and s.max_new_tokens and tokenizer.is_file():
        text = sample_text(config.model_config, result.state.params, tokenizer, s.prompt,
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                           top_p=s.top_p, seed=config.run.seed)
        print_fn(f"--- sample ---\n{text}\n--------------")
    if recipe is not None and hasattr(recipe, "after_train"):
        recipe.after_train(config, result)
    return result
