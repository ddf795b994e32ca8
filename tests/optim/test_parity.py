"""fastllm.optim against torch.optim on a small random problem, step for step."""

import pytest
import torch

from fastllm import optim, tree


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    layer = lambda: {  # noqa: E731
        "attention_norm": {"scale": 1 + 0.1 * rand(8)},
        "attention": {"wq": rand(2, 4, 8) * 0.3, "bq": rand(2, 4) * 0.1},
        "mlp": {"w_up": rand(16, 8) * 0.3, "b_up": rand(16) * 0.1, "w_down": rand(8, 16) * 0.3},
    }
    return {"embed": {"tokens": rand(11, 8) * 0.3}, "layers": [layer(), layer()],
            "lm_head": rand(11, 8) * 0.3}


def loss_fn(params, batch):
    x = params["embed"]["tokens"][batch]  # [n, 8]
    for p in params["layers"]:
        h = x * p["attention_norm"]["scale"]
        q = torch.einsum("hde,ne->nhd", p["attention"]["wq"], h) + p["attention"]["bq"]
        x = x + q.reshape(len(batch), 8)
        u = torch.tanh(h @ p["mlp"]["w_up"].T + p["mlp"]["b_up"])
        x = x + u @ p["mlp"]["w_down"].T
    logits = x @ params["lm_head"].T
    return torch.nn.functional.cross_entropy(logits, (batch + 1) % 11)


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (6,), generator=gen) for _ in range(steps)]


def grads_of(params, batch):
    leaves = [p.detach().requires_grad_(True) for p in tree.leaves(params)]
    spec_params = tree.unflatten(dict(zip(tree.flatten(params), leaves)))
    loss = loss_fn(spec_params, batch)
    grads = torch.autograd.grad(loss, leaves)
    return tree.unflatten(dict(zip(tree.flatten(params), grads)))


def run_ours(opt, steps, params=None):
    params = make_params() if params is None else params
    state = opt.init(params)
    history = []
    for batch in batches(steps):
        updates, state = opt.update(grads_of(params, batch), state, params)
        params = optim.apply_updates(params, updates)
        history.append(params)
    return history, state


def run_torch(make_opt, steps, clip=None):
    flat = tree.flatten(make_params())
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in flat.items()}
    opt, scheduler = make_opt(tensors)
    history, norms = [], []
    for batch in batches(steps):
        opt.zero_grad()
        loss_fn(tree.unflatten(dict(tensors)), batch).backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip))
        opt.step()
        if scheduler is not None:
            scheduler.step()
        history.append({k: v.detach().clone() for k, v in tensors.items()})
    return history, norms


def assert_close_history(ours, theirs, atol=1e-6):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        flat = tree.flatten(a)
        assert flat.keys() == b.keys()
        for name in flat:
            torch.testing.assert_close(flat[name], b[name], atol=atol, rtol=0,
                                       msg=lambda m: f"step {step} {name}: {m}")


STEPS = 12


def test_adamw_matches_torch_decaying_everything():
    ours, _ = run_ours(optim.adamw(1e-2, 0.9, 0.95, 1e-8, 0.1, mask=optim.decay_all), STEPS)
    theirs, _ = run_torch(lambda t: (torch.optim.AdamW(
        t.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), None), STEPS)
    assert_close_history(ours, theirs)
    # the problem really moves the weights, so the comparison is not vacuous
    assert (tree.flatten(ours[-1])["lm_head"] - make_params()["lm_head"]).abs().max() > 1e-2


def test_adamw_default_mask_matches_torch_param_groups():
    decayed = {"layers.0.attention.wq", "layers.1.attention.wq", "layers.0.mlp.w_up",
               "layers.1.mlp.w_up", "layers.0.mlp.w_down", "layers.1.mlp.w_down", "lm_head"}
    picked = {path for path, leaf in tree.leaves_with_path(make_params())
              if optim.default_decay_mask(path, leaf)}
    assert picked == decayed  # not the embedding, norm scales, 1-D or 2-D ([heads, head_dim]) biases

    def make(t):
        groups = [{"params": [v for k, v in t.items() if k in decayed], "weight_decay": 0.3},
                  {"params": [v for k, v in t.items() if k not in decayed], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2), None

    ours, _ = run_ours(optim.adamw(1e-2, weight_decay=0.3), STEPS)
    assert_close_history(ours, run_torch(make, STEPS)[0])


def test_adamw_with_cosine_schedule_and_clipping_matches_torch():
    schedule = optim.schedules.cosine(2e-2, total_steps=10, warmup_steps=3, min_ratio=0.1)
    opt = optim.adamw(schedule, weight_decay=0.1, mask=optim.decay_all, max_grad_norm=0.5)

    def make(t):
        adamw = torch.optim.AdamW(t.values(), lr=2e-2, weight_decay=0.1)
        return adamw, torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: schedule(s) / 2e-2)

    ours, state = run_ours(opt, STEPS)
    theirs, norms = run_torch(make, STEPS, clip=0.5)
    assert_close_history(ours, theirs)
    assert norms[-1] > 0.5  # clipping was active
    logged = optim.get_state(state, optim.ClipByGlobalNormState).norm
    torch.testing.assert_close(logged, norms[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch(nesterov):
    opt = optim.sgd(0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01, mask=optim.decay_all)
    ours, _ = run_ours(opt, STEPS)
    theirs, _ = run_torch(lambda t: (torch.optim.SGD(
        t.values(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01), None), STEPS)
    assert_close_history(ours, theirs)


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_matches_clip_grad_norm(max_norm):
    grads = make_params(seed=3)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in tree.leaves(grads)]
    for p, g in zip(params, tree.leaves(grads)):
        p.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    clip = optim.clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(grads))
    torch.testing.assert_close(state.norm, expected_norm)
    torch.testing.assert_close(optim.global_norm(grads), expected_norm)
    for ours, p in zip(tree.leaves(clipped), params):
        torch.testing.assert_close(ours, p.grad, atol=1e-7, rtol=1e-6)
