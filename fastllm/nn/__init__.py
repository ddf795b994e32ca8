"""Pure layers: each an ``params`` declaration (shapes, logical axes, init) beside its ``apply``."""

from fastllm.nn import param
from fastllm.nn.param import Param, axes, count, init, is_param, shapes

__all__ = ["param", "Param", "axes", "count", "init", "is_param", "shapes"]
