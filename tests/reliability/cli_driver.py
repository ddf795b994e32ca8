"""Run many ``fastllm`` command lines in one process, so Python and torch start once.

Reads a JSON list of argv lists on stdin and writes a JSON list of results on stdout, one per
command line: ``{"code", "stderr", "stdout", "seconds"}``, where ``code`` is the exit status the
command would have had, ``"timeout"`` when it ran past the time limit (a hang), and ``stderr`` holds
what it wrote there, a traceback included when an exception escaped (as Python would print it).
Both streams are captured at the file-descriptor level, so output of native libraries counts too.

    python tests/reliability/cli_driver.py --timeout 20 < cases.json > results.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the code swallows it."""


def _alarm(signum, frame):
    raise Hang()


def _run(argv: list[str]):
    from fastllm import cli

    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse, --help
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Hang:
        return "timeout"
    except BaseException:  # what escapes main is what the user would see as a traceback
        traceback.print_exc()
        return 1


def run_case(argv: list[str], timeout: float) -> dict:
    """One command line with stdout and stderr redirected to files (fd 1 and 2)."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            code = _run(argv)
        except Hang:  # the alarm fired while main was unwinding
            code = "timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout.flush(), sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
        seconds = time.monotonic() - start
        out.seek(0), err.seek(0)
        return {"code": code, "stdout": out.read().decode(errors="replace")[-4000:],
                "stderr": err.read().decode(errors="replace")[-4000:], "seconds": round(seconds, 3)}


def _warm_up() -> None:
    """Import what the commands import lazily, so that no case pays for it: the time limit is for
    hangs, and a first import of transformers alone can take seconds on a busy machine."""
    import transformers

    import fastllm.cli  # noqa: F401
    import fastllm.data  # noqa: F401
    import fastllm.train.run  # noqa: F401
    from fastllm.hf import FAMILIES

    for name in ("GenerationConfig", "AutoTokenizer", *(family.config_class for family in FAMILIES)):
        getattr(transformers, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per command line")
    options = parser.parse_args()
    cases = json.load(sys.stdin)
    _warm_up()
    signal.signal(signal.SIGALRM, _alarm)
    results = [run_case(list(argv), options.timeout) for argv in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
