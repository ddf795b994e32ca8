"""The documentation: the mkdocs site builds with --strict (every link and anchor resolves; the
reference pages are generated from the code), and every code block marked runnable runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(bash|python)\n(.*?)^```$", re.M | re.S)


def runnable_blocks() -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(page, [(language, code), ...]), ...]`` for every page with runnable blocks."""
    pages = []
    for page in sorted(DOCS.rglob("*.md")):
        blocks = RUNNABLE.findall(page.read_text())
        if blocks:
            pages.append((str(page.relative_to(DOCS)), blocks))
    return pages


def test_site_builds_strict(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (pip install 'fastllm[docs]')")
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FASTLLM_TYPECHECK": "0", "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    config = (tmp_path / "reference" / "config" / "index.html").read_text()
    for key in ("run.init_from", "log.tensorboard", "train.batch_size", "model.n_layers"):
        assert key in config, key
    cli = (tmp_path / "reference" / "cli" / "index.html").read_text()
    for command in ("train", "generate", "prepare", "convert", "eval", "plan", "plot"):
        assert f"fastllm {command}" in cli, command
    assert "continuation_logprobs" in (tmp_path / "reference" / "api" / "index.html").read_text()
    assert (tmp_path / "search" / "search_index.json").is_file()


def test_runnable_blocks_are_found():
    pages = dict(runnable_blocks())
    assert {"index.md", "concepts.md", "monitoring.md", "performance.md", "cookbook.md"} <= set(pages)


@pytest.mark.parametrize("page, blocks", runnable_blocks(), ids=lambda value: value if isinstance(value, str) else "")
def test_runnable_blocks_run(page, blocks, tmp_path):
    """A page's runnable blocks, in order, in one fresh directory (``recipes/`` is the repository's)."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "FASTLLM_TYPECHECK": "0", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for number, (language, code) in enumerate(blocks, 1):
        command = ["bash", "-e", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page}, runnable block {number}:\n{code}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
