"""LARS (optim/lars.py) as suncet's LARS(SGD): trust-ratio scaling, exclusions, lr folded into momentum."""
import pytest
import torch

from visrep.optim.lars import LARS


def test_first_step_closed_form_and_exclusion():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    gw, gb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w]}, {"params": [b], "wd_exclude": True, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.001)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    ratio = 0.001 * w0.norm() / (gw.norm() + 1e-2 * w0.norm() + 1e-8)
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (gw + 1e-2 * w0) * ratio)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)            # excluded: plain SGD, no wd


def test_constant_lr_unadapted_equals_torch_sgd():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, 4))
    ref = torch.nn.Parameter(a.detach().clone())
    ours = LARS([{"params": [a], "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        g = torch.randn(4, 4)
        a.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_lr_folded_into_the_buffer():
    """suncet sgd.py: buf <- m buf - lr_t d; with a changing lr past steps keep their own lr."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": True}], lr=1.0, momentum=0.5)
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()                        # buf = -1, p = -1
    opt.param_groups[0]["lr"] = 0.1
    opt.step()                        # buf = -0.5 - 0.1 = -0.6, p = -1.6 (torch.SGD: -1 - 0.1 * 1.5)
    assert p.item() == pytest.approx(-1.6)


def test_zero_norm_skips_adaptation():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.0)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(3))
