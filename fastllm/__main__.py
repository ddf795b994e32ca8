"""``python -m fastllm``: the same command line as ``fastllm``."""

import sys

from fastllm.cli import main

sys.exit(main())
