"""The loader: ranks partition the global stream, state resumes exactly, prefetch changes nothing."""

import itertools

import numpy as np
import pytest
import torch

from fastllm.data import DataConfig, TokenDataset, make_loader, split_documents

SEQ = 16


def config(paths, **changes):
    base = DataConfig(datasets=tuple(zip(paths, (0.5, 0.3, 0.2))), seq_len=SEQ, seed=5, prefetch=2,
                      mask_cross_document_loss=True)
    return base.replace(**changes)


def take(loader, count):
    return [next(loader) for _ in range(count)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_layout(prepared_datasets):
    loader = make_loader(config(prepared_datasets), micro_batch_size=3)
    batch = next(loader)
    loader.close()
    assert set(batch) == {"tokens", "targets", "positions", "segment_ids"}
    for value in batch.values():
        assert value.dtype == torch.int64 and value.shape == (3, SEQ)
    assert torch.equal(batch["targets"][:, :-1][batch["targets"][:, :-1] != -100],
                       batch["tokens"][:, 1:][batch["targets"][:, :-1] != -100])


def test_rows_are_one_stream_without_document_attention(prepared_datasets):
    """``document_attention=False``: the same tokens and targets, no segment ids or positions, so the
    model attends causally over the whole row (the plain SDPA path) with positions 0..L-1."""
    documents, stream = (make_loader(config(prepared_datasets, document_attention=flag), micro_batch_size=3)
                         for flag in (True, False))
    a, b = next(documents), next(stream)
    documents.close(), stream.close()
    assert set(b) == {"tokens", "targets"}
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["targets"], b["targets"])
    assert int(a["segment_ids"].max()) > 0  # the rows do cross documents: the flag changes attention


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_partition_the_single_rank_stream(prepared_datasets, dp_size):
    global_batch, micro = 8, 2
    single = make_loader(config(prepared_datasets, prefetch=0), micro_batch_size=micro, global_batch_size=global_batch)
    ranks = [make_loader(config(prepared_datasets), micro_batch_size=micro, global_batch_size=global_batch,
                         dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for step in range(3):
        whole = torch.cat([b["tokens"] for b in take(single, single.grad_accumulation)])
        parts = [torch.cat([b["tokens"] for b in take(loader, loader.grad_accumulation)]) for loader in ranks]
        assert torch.equal(torch.cat(parts), whole)  # rank r holds the r-th slice of the step's samples
    for loader in ranks:
        loader.close()
    # Each rank reads only its own samples.
    indices = [set(ranks[r].sample_indices(0, m).tolist()) for r in range(dp_size)
               for m in range(ranks[r].grad_accumulation)]
    assert len(set.union(*indices)) == sum(len(i) for i in indices) == global_batch


def test_resume_reproduces_the_following_batches(prepared_datasets):
    cfg = config(prepared_datasets)
    loader = make_loader(cfg, micro_batch_size=2, grad_accumulation=3)
    take(loader, 7)  # mid-step: step 2, micro-step 1
    state = loader.state_dict()
    assert state["step"] == 2 and state["micro_step"] == 1 and all(isinstance(v, int) for v in state.values())
    expected = take(loader, 9)
    loader.close()
    resumed = make_loader(cfg, micro_batch_size=2, grad_accumulation=3)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, take(resumed, 9)))
    resumed.close()
    with pytest.raises(ValueError, match="seed"):
        make_loader(cfg.replace(seed=6), micro_batch_size=2, grad_accumulation=3).load_state_dict(state)


def test_resume_on_another_data_parallel_size_at_a_step_boundary(prepared_datasets):
    cfg = config(prepared_datasets, prefetch=0)
    one = make_loader(cfg, micro_batch_size=2, global_batch_size=4)
    take(one, 4)  # two steps
    state = one.state_dict()
    expected = torch.cat([b["tokens"] for b in take(one, 2)])
    halves = []
    for rank in range(2):
        loader = make_loader(cfg, micro_batch_size=2, global_batch_size=4, dp_rank=rank, dp_size=2)
        loader.load_state_dict(state)
        halves.append(next(loader)["tokens"])
    assert torch.equal(torch.cat(halves), expected)


def test_prefetch_and_random_access_agree(prepared_datasets):
    eager = make_loader(config(prepared_datasets, prefetch=0), micro_batch_size=2, grad_accumulation=2)
    ahead = make_loader(config(prepared_datasets, prefetch=3), micro_batch_size=2, grad_accumulation=2)
    for (step, micro), a, b in zip(itertools.product(range(4), range(2)), take(eager, 8), take(ahead, 8)):
        assert same(a, b) and same(a, eager.batch(step, micro))
    ahead.close()
    other_seed = make_loader(config(prepared_datasets, seed=9, prefetch=0), micro_batch_size=2)
    assert not same(next(other_seed), eager.batch(0, 0))


def test_validation_split_is_disjoint_and_stable(prepared_datasets):
    train, validation = split_documents(300, 0.1, seed=0)
    assert len(validation) == 30 and not set(train) & set(validation) and len(train) + len(validation) == 300
    assert np.array_equal(split_documents(300, 0.1, seed=0)[1], validation)
    cfg = config(prepared_datasets, validation_fraction=0.1)
    train_loader = make_loader(cfg, micro_batch_size=2, split="train")
    val_loader = make_loader(cfg, micro_batch_size=2, split="validation")
    for packed_train, packed_val in zip(train_loader.packed, val_loader.packed):
        assert not set(packed_train.doc_ids) & set(packed_val.doc_ids)
        assert len(packed_train.doc_ids) + len(packed_val.doc_ids) == len(packed_train.dataset)
    # The held-out documents do not move with the training seed.
    reseeded = make_loader(cfg.replace(seed=123), micro_batch_size=2, split="validation")
    assert np.array_equal(reseeded.packed[0].doc_ids, val_loader.packed[0].doc_ids)
    assert next(val_loader)["tokens"].shape == (2, SEQ)
    val_loader.close()
    separate = make_loader(DataConfig(datasets=(prepared_datasets[0],), validation=(prepared_datasets[1],),
                                      seq_len=SEQ, prefetch=0), micro_batch_size=1, split="validation")
    assert len(separate.packed[0].doc_ids) == len(TokenDataset(prepared_datasets[1]))
