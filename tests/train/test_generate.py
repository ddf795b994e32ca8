"""KV-cached decoding: same logits and tokens as the uncached model; sampling filters."""

from __future__ import annotations

import pytest
import torch

from fastllm import generate as gen
from fastllm import models, random


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mistral", "tiny-mixtral"])
def test_cached_forward_matches_uncached_logits(name):
    config = models.preset(name, vocab_size=64, max_seq_len=32)
    params = models.init(config, random.key(0))
    tokens = random.randint(random.key(1), (2, 14), 0, 64)
    expected = models.apply(config, params, tokens)
    cache = models.decoder.init_cache(config, 2)
    first, _, cache = models.forward(config, params, tokens[:, :9], cache=cache)  # prompt, then one at a time
    rest = []
    for i in range(9, 14):
        logits, _, cache = models.forward(config, params, tokens[:, i:i + 1], cache=cache)
        rest.append(logits)
    assert [c.length for c in cache] == [14] * config.n_layers
    got = torch.cat([first] + rest, dim=1)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_cached_greedy_decoding_equals_uncached():
    config = models.preset("tiny-mistral", vocab_size=64, max_seq_len=48)  # window 8 < length
    params = models.init(config, random.key(3))
    prompt = random.randint(random.key(4), (2, 5), 0, 64)
    cached = gen.generate(config, params, prompt, max_new_tokens=20)
    uncached = gen.generate(config, params, prompt, max_new_tokens=20, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_and_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(200, 1)
    key = random.key(0)
    a = gen.sample_next(logits, key, temperature=1.0)
    assert torch.equal(a, gen.sample_next(logits, key, temperature=1.0))
    assert set(gen.sample_next(logits, key, temperature=1.0, top_k=2).tolist()) == {0, 1}
    # probabilities ~ [0.66, 0.24, 0.09, ...]: top_p=0.8 keeps the first two only
    assert set(gen.sample_next(logits, key, temperature=1.0, top_p=0.8).tolist()) == {0, 1}
    assert set(gen.sample_next(logits, key, temperature=1.0, top_p=0.5).tolist()) == {0}
    assert torch.equal(gen.sample_next(logits, None), torch.zeros(200, dtype=torch.long))


def test_generate_rejects_too_long_requests_and_stops_at_eos():
    config = models.preset("tiny-llama", vocab_size=64, max_seq_len=16)
    params = models.init(config, random.key(0))
    prompt = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        gen.generate(config, params, prompt, max_new_tokens=7)
    first = gen.generate(config, params, prompt, max_new_tokens=1)[0, -1].item()
    stopped = gen.generate(config, params, prompt, max_new_tokens=6, eos_id=first)
    assert stopped.shape == (1, 11)
