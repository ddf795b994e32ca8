"""The command line answers at once and explains itself: ``--help`` without torch, ``--version``,
help text on every flag, no Sphinx markup; ``import fastllm`` reaches every submodule lazily."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fastllm import cli

CHILD_HELP = """
import sys, contextlib, io
from fastllm.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "numpy", "transformers", "matplotlib") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["plan", "--help"], ["--version"]])
def test_help_imports_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", CHILD_HELP, *argv], capture_output=True, text=True, check=True,
                          env={"FASTLLM_TYPECHECK": "0", "PATH": ""})
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_help_answers_within_half_a_second():
    best = float("inf")
    for _ in range(3):  # the best of three: a shared machine may stall one start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastllm", "--help"], capture_output=True, check=True,
                       env={"FASTLLM_TYPECHECK": "0", "PATH": ""})
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"fastllm --help took {best:.2f} s"


def test_version(capsys):
    import fastllm

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastllm {fastllm.__version__}"


def _subparsers():
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


def test_every_flag_has_help_and_no_sphinx_markup():
    for name, parser in _subparsers().items():
        text = parser.format_help()
        assert ":func:" not in text and "``" not in text and ":class:" not in text, name
        for action in parser._actions:
            assert action.help, f"fastllm {name} {action.option_strings or action.dest}: no help text"


def test_import_fastllm_reaches_submodules_lazily():
    code = ("import sys, fastllm; assert 'torch' not in sys.modules; "
            "assert callable(fastllm.hf.load) and callable(fastllm.models.init); "
            "assert fastllm.train.Trainer and fastllm.data.prepare; "
            "import fastllm.nope" + "\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"FASTLLM_TYPECHECK": "0", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert "ModuleNotFoundError: No module named 'fastllm.nope'" in done.stderr, done.stderr[-2000:]
    import fastllm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastllm.nope  # noqa: B018


def test_openmp_threads_sleep_when_waiting_unless_told_otherwise():
    """A CPU shared with other jobs: spinning OpenMP threads starved the quickstart tenfold."""
    code = ("import os, sys, contextlib, io\nfrom fastllm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(['--version'])\n"
            "    except SystemExit:\n        pass\n"
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    for given, expected in ((None, "PASSIVE False"), ("ACTIVE", "ACTIVE False")):
        env = {"FASTLLM_TYPECHECK": "0", "PATH": ""} | ({"OMP_WAIT_POLICY": given} if given else {})
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert done.stdout.split("\n")[-2] == expected
