"""Pipeline schedules as data: every action once, dependencies respected, the textbook bubble and
activation memory, and the stage split (fastllm.sharding.pipeline)."""

import pytest

from fastllm.sharding import pipeline
from fastllm.sharding.pipeline import Action


def _expected_actions(pipe: int, micro: int, virtual: int) -> dict[int, set]:
    return {rank: {(kind, chunk, m) for kind in "FB" for chunk in range(rank, pipe * virtual, pipe)
                   for m in range(micro)} for rank in range(pipe)}


@pytest.mark.parametrize("name, pipe, micro, virtual", [
    ("gpipe", 2, 4, 1), ("gpipe", 4, 3, 1), ("1f1b", 2, 1, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1),
    ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2), ("interleaved", 2, 6, 3)])
def test_every_rank_runs_each_of_its_actions_once_without_deadlock(name, pipe, micro, virtual):
    actions = pipeline.schedule(name, pipe, micro, virtual)
    expected = _expected_actions(pipe, micro, virtual)
    for rank, row in enumerate(actions):
        seen = [(a.kind, a.chunk, a.micro) for a in row]
        assert len(seen) == len(set(seen)) and set(seen) == expected[rank], (name, rank, [str(a) for a in row])
    pipeline.simulate(actions)  # raises on a deadlock


def _bubble(name, pipe, micro, virtual=1):
    return pipeline.simulate(pipeline.schedule(name, pipe, micro, virtual)).bubble


@pytest.mark.parametrize("pipe, micro", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_one_f_one_b_bubble_is_the_textbook_fraction(pipe, micro):
    assert _bubble("1f1b", pipe, micro) == pytest.approx((pipe - 1) / (micro + pipe - 1))
    assert _bubble("gpipe", pipe, micro) == pytest.approx((pipe - 1) / (micro + pipe - 1))


def test_interleaving_shrinks_the_bubble():
    assert _bubble("interleaved", 4, 8, 2) < _bubble("1f1b", 4, 8)
    assert _bubble("interleaved", 4, 8, 4) < _bubble("interleaved", 4, 8, 2)


def _peak_in_flight(row: list[Action]) -> int:
    live, peak = 0, 0
    for action in row:
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


def test_one_f_one_b_holds_at_most_pipe_minus_rank_micro_batches():
    pipe, micro = 4, 16
    for rank, row in enumerate(pipeline.schedule("1f1b", pipe, micro)):
        assert _peak_in_flight(row) == pipe - rank
    assert all(_peak_in_flight(row) == micro for row in pipeline.schedule("gpipe", pipe, micro))


def test_interleaved_holds_megatrons_warmup_plus_one_chunk_activations():
    pipe, micro, virtual = 4, 8, 2
    for rank, row in enumerate(pipeline.schedule("interleaved", pipe, micro, virtual)):
        assert _peak_in_flight(row) == (pipe - rank - 1) * 2 + (virtual - 1) * pipe + 1


def test_timeline_prints_each_rank_and_the_bubble():
    text = str(pipeline.simulate(pipeline.schedule("1f1b", 2, 2)))
    assert text.splitlines() == ["pipe 0: F0.0 F0.1 .... B0.0 .... B0.1",
                                 "pipe 1: .... F1.0 B1.0 F1.1 B1.1 ....",
                                 "bubble 33.3% of 2 ranks x 6 time units"], text


def test_bad_schedules_name_the_problem():
    with pytest.raises(ValueError, match="pipe.schedule must be one of"):
        pipeline.schedule("zigzag", 2, 4)
    with pytest.raises(ValueError, match="needs pipe.schedule='interleaved'"):
        pipeline.schedule("1f1b", 2, 4, virtual=2)
    with pytest.raises(ValueError, match="groups of pipe=4"):
        pipeline.schedule("interleaved", 4, 6, virtual=2)
    with pytest.raises(ValueError, match="deadlocks"):
        pipeline.simulate([[Action("B", 0, 0), Action("F", 0, 0)], [Action("F", 1, 0), Action("B", 1, 0)]])


def test_chunks_balance_parameters_and_keep_the_ends_with_the_first_and_last_chunk():
    layers = [None, 0, 1, 2, 3, None]  # embedding, four blocks, head
    assert pipeline.chunk_of_parts(layers, [50, 10, 10, 10, 10, 50], 2) == [0, 0, 0, 1, 1, 1]
    assert pipeline.chunk_of_parts(layers, [50, 30, 10, 10, 10, 50], 2) == [0, 0, 1, 1, 1, 1]
    assert pipeline.chunk_of_parts(layers, [1] * 6, 4) == [0, 0, 1, 2, 3, 3]
    assert pipeline.chunk_of_parts(layers, [1] * 6, 2, split=[3, 1]) == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="cannot fill 8 pipeline chunks"):
        pipeline.chunk_of_parts(layers, [1] * 6, 8)
    with pytest.raises(ValueError, match="pipe.split"):
        pipeline.chunk_of_parts(layers, [1] * 6, 2, split=[2, 1])
