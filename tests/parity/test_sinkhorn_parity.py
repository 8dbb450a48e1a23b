"""Sinkhorn-Knopp matches the official MSN ``distributed_sinkhorn`` (every ``msn_sinkhorn`` fixture)."""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.losses import sinkhorn, sinkhorn_logits


@pytest.mark.parametrize("path", fixtures_of_kind("msn_sinkhorn"))
def test_msn_sinkhorn(path):
    fx = load_fixture(path)
    for i, case in enumerate(fx.config["cases"]):
        q_in = fx.tensors[f"in.case{i}.Q"]
        before = q_in.clone()
        out = sinkhorn(q_in, n_iters=case["num_itr"])
        fx.assert_close(f"out.case{i}.Q", out)
        assert torch.equal(q_in, before), "sinkhorn must not modify its input"
        # the logit form gives the same assignments (the max shift cancels), to float32 precision
        torch.testing.assert_close(sinkhorn_logits(q_in.log(), case["num_itr"]).double(), fx.tensors[f"out.case{i}.Q"],
                                   atol=1e-5, rtol=1e-5)


def test_sinkhorn_marginals_and_float32_safety():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 5
    q = sinkhorn_logits(logits, n_iters=50)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((16,), 64 / 16), atol=1e-3, rtol=0)
    # the official form overflows in float32 at these scales; ours stays finite and equals the f64 result
    big = logits * 40
    assert not torch.isfinite(torch.exp(big)).all()
    out = sinkhorn_logits(big, 3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(64))
    # a prior marginal: prototype columns get mass proportional to it
    prior = torch.arange(1, 17, dtype=torch.float32) ** -0.25
    prior /= prior.sum()
    qp = sinkhorn_logits(logits, n_iters=200, marginal=prior)
    torch.testing.assert_close(qp.sum(1), torch.ones(64))
    torch.testing.assert_close(qp.sum(0) / 64, prior, atol=1e-4, rtol=0)
