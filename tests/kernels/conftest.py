"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

``fastllm.kernels`` decides compiled-vs-interpreted at launch time and only interprets when
``TRITON_INTERPRET=1`` is set, so setting it here (before anything launches) is enough whatever
the import order of the suite.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
