"""fastllm: declarative, functional, JAX-style LLM training on PyTorch.

Light submodules are imported here; heavy ones (``fastllm.hf``, ``fastllm.data``, ``fastllm.train``,
``fastllm.sharding``, ``fastllm.kernels``) are imported by name when needed.
"""

import os as _os

if _os.environ.get("FASTLLM_TYPECHECK", "0") == "1":
    # Shape/dtype annotations become runtime checks for every fastllm module imported from here on.
    from jaxtyping import install_import_hook as _install_import_hook

    _install_import_hook("fastllm", "beartype.beartype")

from fastllm import random, tree  # noqa: E402

__version__ = "0.1.0"
__all__ = ["random", "tree", "__version__"]
