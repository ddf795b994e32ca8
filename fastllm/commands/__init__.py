"""The ``fastllm`` subcommands beyond ``train`` and ``generate``, one module each.

Each module defines ``add_parser(subparsers)`` and ``run(args)``. Building a parser imports only
``argparse`` (so ``fastllm --help`` answers without importing torch); ``run`` imports what the
command needs.
"""
