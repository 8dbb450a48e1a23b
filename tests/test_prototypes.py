"""Closed-form checks of the prototype-family building blocks (losses/prototypes.py) and
2 gloo processes == 1 process for the MSN and PAWS losses (gradients included)."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from visrep.losses import me_max, msn_loss, paws_loss, power_law_prior, prior_kl, sharpen, sinkhorn, smoothed_one_hot


def test_sharpen_closed_form():
    out = sharpen(torch.tensor([[0.25, 0.75]], dtype=torch.float64), 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.9]], dtype=torch.float64))
    p = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    assert (sharpen(p, 0.25).max(1).values > p.max(1).values).all()


def test_me_max_limits():
    k = 8
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    onehot = torch.zeros(k, dtype=torch.float64)
    onehot[3] = 1.0
    assert me_max(uniform, "msn").item() == pytest.approx(0.0, abs=1e-12)
    assert me_max(onehot, "msn").item() == pytest.approx(math.log(k))
    assert me_max(uniform, "paws").item() == pytest.approx(-math.log(k))
    assert me_max(onehot, "paws").item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        me_max(uniform, "dino")


def test_power_law_prior_and_kl_directions():
    prior = power_law_prior(3, 0.25, dtype=torch.float64)
    w = torch.tensor([1.0, 2 ** -0.25, 3 ** -0.25], dtype=torch.float64)
    torch.testing.assert_close(prior, w / w.sum())
    p = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    assert prior_kl(p, prior, "prior_to_mean").item() == pytest.approx((prior * (prior / p).log()).sum().item())
    assert prior_kl(p, prior, "mean_to_prior").item() == pytest.approx((p * (p / prior).log()).sum().item())
    assert prior_kl(prior, prior, "mean_to_prior").item() == pytest.approx(0.0, abs=1e-12)
    # a uniform prior turns the PMSN regulariser into MSN's ME-MAX exactly
    uniform = power_law_prior(3, 0.0, dtype=torch.float64)
    for direction in ("mean_to_prior",):
        assert prior_kl(p, uniform, direction).item() == pytest.approx(me_max(p, "msn").item())
    with pytest.raises(ValueError):
        prior_kl(p, prior, "both")


def test_sinkhorn_marginals_uniform_and_power_law():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(40, 8, generator=g, dtype=torch.float64) / 0.3, 1)
    torch.testing.assert_close(sinkhorn(q, 3).sum(1), torch.ones(40, dtype=torch.float64))
    out = sinkhorn(q, 200)
    torch.testing.assert_close(out.sum(0), torch.full((8,), 5.0, dtype=torch.float64), atol=1e-6, rtol=0)
    prior = power_law_prior(8, 0.25, dtype=torch.float64)
    out = sinkhorn(q, 200, marginal=prior)
    torch.testing.assert_close(out.sum(0) / 40, prior, atol=1e-6, rtol=0)


def test_msn_loss_uniform_prior_is_msn():
    g = torch.Generator().manual_seed(1)
    a, t, p = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (12, 4, 5))
    base = msn_loss(a, t, p, tau=0.1, T=0.25)
    pm = msn_loss(a, t, p, tau=0.1, T=0.25, prior=power_law_prior(5, 0.0, dtype=torch.float64))
    for k in ("loss", "ce", "me_max", "targets"):
        torch.testing.assert_close(pm[k], base[k])
    skewed = msn_loss(a, t, p, tau=0.1, T=0.25, prior=power_law_prior(5, 1.0, dtype=torch.float64))
    assert not torch.allclose(skewed["targets"], base["targets"])   # Sinkhorn follows the prior


def test_smoothed_one_hot():
    out = smoothed_one_hot(torch.tensor([2, 0]), 4, 0.1, dtype=torch.float64)
    torch.testing.assert_close(out.sum(1), torch.ones(2, dtype=torch.float64))
    assert out[0, 2].item() == pytest.approx(0.9 + 0.025) and out[0, 0].item() == pytest.approx(0.025)


# -- 2 processes == 1 process ------------------------------------------------------------------
def _inputs():
    g = torch.Generator().manual_seed(7)
    B, V, D, K = 6, 3, 8, 5
    msn = dict(anchors=torch.randn(V * B, D, generator=g, dtype=torch.float64),
               targets=torch.randn(B, D, generator=g, dtype=torch.float64),
               protos=torch.randn(K, D, generator=g, dtype=torch.float64))
    C, S = 4, 2
    labels = smoothed_one_hot(torch.arange(C).repeat(S * 2), C, 0.1, dtype=torch.float64)   # 2 ranks x S x C
    paws = dict(views=torch.randn(4 * B, D, generator=g, dtype=torch.float64),
                targets=torch.randn(2 * B, D, generator=g, dtype=torch.float64),
                sup=torch.randn(2 * S * C, D, generator=g, dtype=torch.float64),
                tsup=torch.randn(2 * S * C, D, generator=g, dtype=torch.float64), labels=labels)
    return B, msn, paws


def _rows(x, views, rank, world):
    """This rank's rows of a view-major [views * N, D] tensor."""
    n = x.shape[0] // views
    per = n // world
    return torch.cat([x[v * n + rank * per: v * n + (rank + 1) * per] for v in range(views)])


def _losses(rank, world, prior=None):
    B, m, p = _inputs()
    a = _rows(m["anchors"], 3, rank, world).requires_grad_(True)
    protos = m["protos"].clone().requires_grad_(True)
    out = msn_loss(a, _rows(m["targets"], 1, rank, world), protos, tau=0.1, T=0.25, entropy_weight=0.3, prior=prior)
    out["loss"].backward()
    views = _rows(p["views"], 4, rank, world).requires_grad_(True)
    sup = _rows(p["sup"], 1, rank, world).requires_grad_(True)
    out2 = paws_loss(views, sup, _rows(p["labels"], 1, rank, world), _rows(p["targets"], 2, rank, world),
                     _rows(p["tsup"], 1, rank, world), _rows(p["labels"], 1, rank, world), multicrop=2)
    out2["loss"].backward()
    # the global objective is mean_r L_r: autograd through the collectives gives d(sum_r L_r)/d(rows)
    return {"msn": out["loss"].item(), "paws": out2["loss"].item(), "g_anchor": a.grad / world,
            "g_proto": protos.grad, "g_views": views.grad / world, "g_sup": sup.grad / world}


def _worker(rank, world, port, out_dir):
    from visrep import distributed as D

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    D.init_distributed("gloo")
    try:
        res = _losses(rank, world)
        proto = res["g_proto"].clone()
        torch.distributed.all_reduce(proto)
        res["g_proto"] = proto / world               # DDP's average of the parameter gradient
        res["pmsn"] = _losses(rank, world, prior=power_law_prior(5, 0.5, dtype=torch.float64))["msn"]
        torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        D.cleanup()


@pytest.mark.ddp
def test_losses_two_processes_equal_one(tmp_path, free_port):
    one = _losses(0, 1)
    one["pmsn"] = _losses(0, 1, prior=power_law_prior(5, 0.5, dtype=torch.float64))["msn"]
    mp.start_processes(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"r{rank}.pt", weights_only=True) for rank in range(2)]
    for k in ("msn", "paws", "pmsn"):  # each rank's loss is its share: their mean is the global loss
        assert (ranks[0][k] + ranks[1][k]) / 2 == pytest.approx(one[k], rel=1e-12), k
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["g_proto"], one["g_proto"])
        for k, views in (("g_anchor", 3), ("g_views", 4), ("g_sup", 1)):
            torch.testing.assert_close(r[k], _rows(one[k], views, rank, 2), msg=k)
