"""Expert parallelism: tiny Mixtral trains like one process with its experts spread over ranks.

One 4-rank spawn runs every layout of expert_checks.LAYOUTS (experts over data=4, over data=2 with
attention and expert MLPs tensor parallel, at ZeRO-3, under sequence parallelism, over tensor, with
accumulation 2, a routing so skewed that one rank receives nearly every token, and capacity mode)
against one process, then trains with experts over 4 ranks and saves a checkpoint; a 2-rank spawn
checks data=2 at ZeRO-3 and resumes the checkpoint there; this process resumes it alone and
exports it to Hugging Face Mixtral.
"""

from pathlib import Path

import pytest
import torch

import expert_checks
from fastllm import hf, models, nn, random
from fastllm.sharding import COMPUTE_RULES, Mesh, testing
from fastllm.sharding import checkpoint as sharded

pytestmark = pytest.mark.distributed


def assert_all_ok(reports: list[dict], expected: int) -> None:
    checks = [{name: outcome for name, outcome in report.items() if name != "losses"} for report in reports]
    assert all(len(report) == expected for report in checks), f"checks did not run: {checks[0].keys()}"
    failures = [f"rank {rank} {name}:\n{outcome}" for rank, report in enumerate(checks)
                for name, outcome in report.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))


def test_expert_layouts_match_one_process_and_checkpoints_reshard(tmp_path):
    path = str(tmp_path / "experts-over-4")
    reports = testing.run(expert_checks.world_4, 4, path, timeout_s=600.0)
    assert_all_ok(reports, sum(len(layout[4]) for layout in expert_checks.LAYOUTS) + 1)
    full = reports[0]["losses"]
    assert all(report["losses"] == full for report in reports)

    reports = testing.run(expert_checks.world_2, 2, path, timeout_s=300.0)
    assert_all_ok(reports, sum(len(layout[4]) for layout in expert_checks.WORLD_2_LAYOUTS))
    assert close(reports[0]["losses"], full[expert_checks.SAVE_AT:]), (reports[0]["losses"], full)

    alone = expert_checks.resume_run(Mesh.local(), 0, COMPUTE_RULES, path, resume=True)
    assert close(alone, full[expert_checks.SAVE_AT:]), (alone, full)
    export_to_mixtral(Path(path), tmp_path / "hf")


def export_to_mixtral(path: Path, out: Path) -> None:
    """``fastllm convert`` of the checkpoint saved by 4 ranks: transformers' Mixtral computes the
    logits of the whole parameters the shards make up."""
    import transformers

    assert hf.convert(path, out) == "hf"
    _, trees = sharded.load_full(path, names=["params"])
    config = expert_checks.config()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(models.apply(config, trees["params"], ids), theirs, atol=1e-5, rtol=1e-4)


def router_picks(params: dict, config) -> torch.Tensor:
    """Each expert's share of the top-k picks of the first check batch, over every layer."""
    model, carry, batch = models.model(config), {}, expert_checks.pc.batches(config)[0]
    for part in model.parts[:-1]:  # the head turns the statistics into losses
        carry = part.fn(part.static, nn.model.part_params(part, params), carry, batch, None)
    picks = carry["moe_tokens_per_expert"].sum((0, 1))
    return picks / picks.sum()


def test_the_skewed_routing_sends_nearly_every_token_to_one_data_rank():
    """The premise of the skewed layout: experts 0 and 1 (data rank 0's, with experts over data=2)
    take over 90% of the picks; capacity mode then drops some and says how many, as one process does."""
    config = expert_checks.config()
    params = expert_checks.initial_params(config, random.key(7), skew=True)
    with torch.no_grad():
        assert router_picks(params, config)[:2].sum() > 0.9
        plain = expert_checks.initial_params(config, random.key(7), skew=False)
        assert router_picks(plain, config)[:2].sum() < 0.7
        capped = expert_checks.config(capacity_factor=1.0)
        dropped = expert_checks.aux_of(capped, params, expert_checks.pc.batches(capped)[0])["moe_dropped_fraction"]
    assert 0.3 < dropped < 0.5  # experts 0 and 1 take 8 of their ~16 picks a sequence each
