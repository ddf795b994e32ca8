"""fastllm: declarative, functional, JAX-style LLM training on PyTorch.

Every submodule is reachable from the package (``import fastllm; fastllm.hf.load(...)``) and
imported on first use, so ``import fastllm`` (and ``fastllm --help``) does not pay for torch.
"""

import importlib as _importlib
import os as _os

if _os.environ.get("FASTLLM_TYPECHECK", "0") == "1":
    # Shape/dtype annotations become runtime checks for every fastllm module imported from here on.
    from jaxtyping import install_import_hook as _install_import_hook

    _install_import_hook("fastllm", "beartype.beartype")

__version__ = "0.1.0"

# Submodules reached as attributes; each is imported the first time it is asked for.
_SUBMODULES = ("checkpoint", "cli", "config", "data", "errors", "evaluation", "generate", "hf", "kernels", "models",
               "nn", "optim", "random", "sharding", "train", "tree", "typing")

__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"fastllm.{name}")  # the import also sets it on the package
    raise AttributeError(f"module 'fastllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
