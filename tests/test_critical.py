"""Critical-gradient optimizers, default (paper) mode: closed forms, buffer invariants, torch equivalence
at kappa = 0, exact resume from a state_dict, parameter groups and missing gradients."""
import io

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.optim.Optimizer imports it lazily: pay once at collection, not in a test)

from visrep.optim.critical import SGD_C, SGDC, AdamC, RMSpropC

F64 = torch.float64


def _grads(n_steps, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_steps, *shape, generator=g, dtype=F64)


def _loss_grads(params, t):
    """Deterministic gradients of a toy non-quadratic loss at the current params, plus step-t noise
    (cheaper than autograd on a loaded CPU)."""
    g = torch.Generator().manual_seed(100 + t)
    return [torch.tanh(p.detach() - 0.3 * (i + 1)) + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for i, p in enumerate(params)]


def _make_params(dtype=F64):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((4, 3), (4,), (2, 4), (2,))]


def _step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


@pytest.mark.parametrize("aggr,scale", [("sum", 1.0), ("mean", 0.5), ("mid", 0.5)])
def test_top1_no_decay_closed_form(aggr, scale):
    """topC = 1, decay = 0: the newest gradient always replaces the stored one, so g_hat_t = g_t + g_{t-1}
    ('sum'), halved for 'mean' ((g + sum B)/2) and 'mid'; the first step uses g_0. The lr schedule is read
    at every step."""
    p = torch.nn.Parameter(torch.zeros(5, dtype=F64))
    opt = SGDC([p], lr=1.0, topc=1, decay=0.0, aggr=aggr)
    grads = _grads(6, 5)
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = lr = 0.5 + 0.1 * t
        before = p.detach().clone()
        _step_with(opt, [p], [g])
        expected = g if t == 0 else scale * (g + grads[t - 1])
        torch.testing.assert_close(before - p.detach(), lr * expected, rtol=1e-12, atol=1e-12)
        assert len(opt.memory(p, opt.param_groups[0])) == 1


def _torch_pair(cls, ref_cls, kw, n_steps=8):
    """The same toy problem with ours (kappa = 0) and torch's optimizer; return both parameter lists."""
    runs = [_make_params(), _make_params()]
    opts = [cls(runs[0], kappa=0.0, **kw), ref_cls(runs[1], **kw)]
    for t in range(n_steps):
        for params, opt in zip(runs, opts):
            _step_with(opt, params, _loss_grads(params, t))
    assert not any(k.startswith("cg_") for s in opts[0].state.values() for k in s), "kappa=0 allocated a buffer"
    return runs


@pytest.mark.parametrize("cls,ref_cls,kw", [
    (SGDC, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (SGDC, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (AdamC, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01, amsgrad=True)),
    (AdamC, torch.optim.Adam, dict(lr=0.01)),
    (RMSpropC, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01)),
    (RMSpropC, torch.optim.RMSprop, dict(lr=0.01)),
])
def test_kappa0_is_the_base_optimizer(cls, ref_cls, kw):
    ours, ref = _torch_pair(cls, ref_cls, kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_buffer_keeps_exact_top_c_and_decays_geometrically():
    """Unsynced priorities = ||g||; simulate exact top-C with decay in python and compare every step."""
    C, decay, n_steps = 3, 0.8, 25
    norms = torch.rand(n_steps, generator=torch.Generator().manual_seed(1), dtype=F64) * 4 + 0.1
    directions = torch.nn.functional.normalize(_grads(n_steps, 6, seed=2), dim=1)
    grads = directions * norms[:, None]
    p = torch.nn.Parameter(torch.zeros(6, dtype=F64))
    opt = SGDC([p], lr=0.0, topc=C, decay=decay, synced=False)
    kept: dict[int, float] = {}  # step -> current priority
    for t in range(n_steps):
        _step_with(opt, [p], [grads[t]])
        q = norms[t].item()
        if len(kept) < C:
            kept[t] = q
        else:
            low = min(kept, key=kept.get)
            if q > kept[low]:
                del kept[low]
                kept[t] = q
        kept = {s: v * decay for s, v in kept.items()}
        buf = opt.memory(p, opt.param_groups[0])
        assert len(buf) == len(kept) <= C
        order = sorted(kept, key=kept.get)
        prio, stored = buf.priorities(), buf.grads()
        idx = prio.argsort()
        torch.testing.assert_close(prio[idx], torch.tensor([kept[s] for s in order], dtype=F64), rtol=1e-12, atol=0)
        torch.testing.assert_close(stored[idx], grads[order], rtol=0, atol=0)
        # geometric decay: an item stored at step s has priority ||g_s|| * decay^(t - s + 1)
        for s in order:
            assert kept[s] == pytest.approx(norms[s].item() * decay ** (t - s + 1), rel=1e-12)


def test_aggregation_variants():
    """Buffer of three gradients with distinct priorities; every aggr against its formula."""
    C, kappa = 3, 0.5
    grads = _grads(4, 5, seed=3)
    norms = grads.norm(dim=1)
    p = torch.nn.Parameter(torch.zeros(5, dtype=F64))
    for aggr, expected in {
        "sum": lambda g, B, b: g + kappa * B.mean(0),
        "mean": lambda g, B, b: (g + kappa * B.sum(0)) / (len(B) + 1),
        "mid": lambda g, B, b: (g + kappa * B.mean(0)) / 2,
        "min": lambda g, B, b: g + kappa * b["min"],
        "max": lambda g, B, b: g + kappa * b["max"],
        "median": lambda g, B, b: g + kappa * b["median"],
        "min-mean": lambda g, B, b: (g + kappa * b["min"]) / 2,
        "max-mean": lambda g, B, b: (g + kappa * b["max"]) / 2,
        "median-mean": lambda g, B, b: (g + kappa * b["median"]) / 2,
    }.items():
        opt = SGDC([p], lr=0.0, topc=C, decay=0.9, kappa=kappa, aggr=aggr, synced=False)
        for g in grads[:3]:
            _step_with(opt, [p], [g])
        rank = norms[:3].argsort()
        picks = {"min": grads[rank[0]], "median": grads[rank[1]], "max": grads[rank[2]]}
        got = opt.aggregate(p, grads[3], opt.param_groups[0])
        torch.testing.assert_close(got, expected(grads[3], grads[:3], picks), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [AdamC, RMSpropC])
def test_kappa_scales_memory_unless_reference_compat(cls):
    """AdamC / RMSpropC honour kappa in 'mean' ((g + kappa sum B)/(|B|+1)); the reference uses 1."""
    grads = _grads(3, 4, seed=8)
    for compat, kappa_used in ((False, 0.25), (True, 1.0)):
        p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
        opt = cls([p], kappa=0.25, topc=5, reference_compat=compat)
        for g in grads[:2]:
            _step_with(opt, [p], [g])
        got = opt.aggregate(p, grads[2], opt.param_groups[0])
        torch.testing.assert_close(got, (grads[2] + kappa_used * grads[:2].sum(0)) / 3, rtol=1e-12, atol=1e-14)


def _run(cls, kw, n_steps, resume_at=None):
    """Optimize float32 params; optionally rebuild params + optimizer from a saved checkpoint at ``resume_at``."""
    params = _make_params(torch.float32)
    opt = cls(params, **kw)
    for t in range(n_steps):
        if t == resume_at:
            blob = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, blob)
            blob.seek(0)
            ckpt = torch.load(blob)
            params = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
            opt = cls(params, **kw)
            opt.load_state_dict(ckpt["opt"])
        _step_with(opt, params, _loss_grads(params, t))
    return params, opt


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("cls,kw", [
    (SGDC, dict(lr=0.1, momentum=0.9, weight_decay=0.01, topc=3, decay=0.9)),
    (AdamC, dict(lr=0.01, amsgrad=True, weight_decay=0.01, topc=4, decay=0.8, aggr="median")),
    (RMSpropC, dict(lr=0.01, momentum=0.5, centered=True, topc=3, decay=0.95, aggr="sum", synced=False)),
])
def test_state_dict_resume_is_exact(cls, kw, compat):
    kw = dict(kw, reference_compat=compat)
    straight, opt_a = _run(cls, kw, 12)
    resumed, opt_b = _run(cls, kw, 12, resume_at=6)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for pa, pb in zip(straight, resumed):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        assert sb["cg_priorities"].dtype == torch.float64 and sb["cg_order"].dtype == torch.int64
        for key, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key])), key


def test_param_groups_and_missing_grads():
    """Synced priority = sum of per-tensor norms of the group's params that have a gradient; a param
    whose grad is None is left untouched and gets no state; groups keep their own settings."""
    a, b, c, d = (torch.nn.Parameter(torch.zeros(s, dtype=F64)) for s in ((3, 2), (3,), (4,), (2,)))
    opt = SGD_C([{"params": [a, b, d]}, {"params": [c], "topc": 2, "lr": 0.5}], lr=0.1, decay=0.5, momentum=0.9)
    ga, gb, gc = _grads(1, 3, 2, seed=4)[0], _grads(1, 3, seed=5)[0], _grads(1, 4, seed=6)[0]
    _step_with(opt, [a, b, c, d], [ga, gb, gc, None])
    g0, g1 = opt.param_groups
    synced = (ga.norm() + gb.norm()).item() * 0.5
    assert opt.memory(a, g0).priorities().tolist() == pytest.approx([synced], rel=1e-12)
    assert opt.memory(b, g0).priorities().tolist() == pytest.approx([synced], rel=1e-12)
    assert opt.memory(c, g1).priorities().tolist() == pytest.approx([gc.norm().item() * 0.5], rel=1e-12)
    assert opt.state[c]["cg_grads"].shape == (2, 4) and opt.state[a]["cg_grads"].shape == (10, 3, 2)
    assert len(opt.state[d]) == 0 and torch.count_nonzero(d) == 0
    torch.testing.assert_close(c.detach(), -0.5 * gc)
    torch.testing.assert_close(a.detach(), -0.1 * ga)
    # second step: d gets a gradient for the first time and starts its own buffer (raw gradient used)
    gd = _grads(1, 2, seed=7)[0]
    _step_with(opt, [a, b, c, d], [None, None, None, gd])
    torch.testing.assert_close(d.detach(), -0.1 * gd)
    assert len(opt.memory(d, g0)) == 1 and len(opt.memory(a, g0)) == 1
    assert opt.memory(a, g0).priorities().tolist() == pytest.approx([synced], rel=1e-12)  # a was skipped


@pytest.mark.parametrize("kw", [dict(topc=0), dict(decay=1.5), dict(kappa=-1.0), dict(aggr="bogus"),
                                dict(nesterov=True)])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        SGDC([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("aggr", ["sum", "mean", "min", "max-mean", "median"])
def test_default_mode_never_reads_tensors_on_the_host(aggr, monkeypatch):
    """The exact buffer is kept with tensor ops only (no .item()/.tolist()/bool(): no GPU sync per step)."""
    params = _make_params()
    opt = AdamC(params, topc=2, aggr=aggr, weight_decay=0.01)
    grads = [_loss_grads(params, t) for t in range(5)]

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor inside step()")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for g in grads:
        _step_with(opt, params, g)
    monkeypatch.undo()
    assert len(opt.memory(params[0], opt.param_groups[0])) == 2
