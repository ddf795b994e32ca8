"""``models.apply`` (forward and backward) under ``torch.compile`` with no graph break.

Runs in a subprocess with FASTLLM_TYPECHECK=0: the jaxtyping import hook wraps every fastllm function
in a beartype checker, and dynamo cannot trace beartype's checking code (it fails inside beartype's
violation reporting). Runtime shape checks are a test-suite aid, not part of the compiled program.
The backend is ``aot_eager``: it exercises dynamo's full-graph capture and AOTAutograd's forward and
backward graphs, the parts our code controls, in seconds; inductor's C++ codegen would take over a
minute on the shared 2-core CI machine and tests torch rather than fastllm.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    from fastllm import models, random, tree

    config = models.preset("tiny-llama", n_layers=1)
    params = models.init(config, random.key(0))
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    apply = torch.compile(lambda p, t: models.apply(config, p, t), backend="aot_eager", fullgraph=True)
    weights = torch.randn(2, 16, config.vocab_size, generator=torch.Generator().manual_seed(1))

    def run(fn):
        leaves = tree.map(lambda t: t.clone().requires_grad_(True), params)
        logits = fn(leaves, tokens)
        (logits * weights).sum().backward()
        return logits.detach(), tree.flatten(tree.map(lambda t: t.grad, leaves))

    eager_logits, eager_grads = run(lambda p, t: models.apply(config, p, t))
    logits, grads = run(apply)
    torch.testing.assert_close(logits, eager_logits)
    for path in eager_grads:
        torch.testing.assert_close(grads[path], eager_grads[path], atol=1e-5, rtol=1e-5, msg=path)
    print("COMPILE_OK")
    """
)


def test_apply_compiles_without_graph_breaks_and_matches_eager():
    env = dict(os.environ, FASTLLM_TYPECHECK="0")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "COMPILE_OK" in result.stdout, result.stderr[-3000:]
