"""Compiled blocks (``train.compile``, fastllm/train/compile.py) train as eager does.

The checks (compile_checks.py) run in a subprocess with FASTLLM_TYPECHECK=0: the suite's jaxtyping
hook wraps every fastllm function in beartype, which dynamo cannot trace; compiled blocks refuse to
run under it, which the last test checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).parent / "compile_checks.py"


def run_checks(part: str):
    env = dict(os.environ, FASTLLM_TYPECHECK="0")
    result = subprocess.run([sys.executable, str(CHECKS), part], env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["result"]


def test_single_device_loss_gradients_and_step_equal_eager_in_one_graph():
    assert run_checks("single") == "ok"


def test_fp8_projections_compile_into_the_block_graph_and_equal_eager():
    assert run_checks("fp8") == {"graph_breaks": 0, "unique_graphs": 1}


def test_packed_documents_keep_one_graph_per_block():
    """FlexAttention's block mask of packed documents is built before the compiled block, neither
    looked up inside it (a graph break: a fusion barrier and a saved activation in every block) nor
    built inside it (every layer again); the compiled block's output equals eager's and the prepared
    masks are dropped after the call."""
    assert run_checks("packed") == {"graph_breaks": 0, "unique_graphs": 1}


def test_packed_documents_compiled_equal_eager_batch_after_batch():
    """No block mask of an earlier batch is reused: compiled parts and a plain torch.compile of the
    blocks equal eager on each of four batches of different documents."""
    assert run_checks("batches") == {"compiled_parts": True, "plain_compile": True}


@pytest.mark.distributed
def test_zero3_sequence_parallel_and_pipeline_gradients_equal_eager():
    for rank in run_checks("distributed"):
        # ZeRO-3: gathers stay outside, the block is one graph. tensor=2 + SP: the collectives run
        # eagerly, so dynamo splits the block at them (4 moves a block: pieces between them)
        assert rank["data2_zero3"] == {"graph_breaks": 0, "unique_graphs": 1}, rank
        assert rank["tensor2_sp"]["graph_breaks"] >= 4 and rank["tensor2_sp"]["unique_graphs"] >= 5, rank
        assert rank["pipe2"] == {"graph_breaks": 0, "unique_graphs": 1}, rank  # the stage's one block


def test_compiled_parts_refuse_the_typecheck_hook(monkeypatch):
    from fastllm.train.compile import CompiledParts

    monkeypatch.setenv("FASTLLM_TYPECHECK", "1")
    with pytest.raises(RuntimeError, match="FASTLLM_TYPECHECK=0"):
        CompiledParts("aot_eager")
