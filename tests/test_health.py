"""Collapse signals (visrep/engine/health.py): each scalar on cases with a known answer, the monitor's
once-only warning, and a toy run whose collapse is caught while a healthy one stays quiet."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from visrep.engine.health import HealthMonitor, effective_rank, embedding_std, health_stats, target_stats


def test_effective_rank_counts_the_dimensions_used():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 16, generator=g)
    line = torch.randn(512, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(spread) > 14                      # isotropic: close to 16
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    two = torch.cat([torch.randn(512, 2, generator=g), torch.zeros(512, 14)], 1)
    assert effective_rank(two) == pytest.approx(2.0, abs=0.15)


def test_embedding_std_is_one_when_spread_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(1)
    assert embedding_std(torch.randn(4096, 32, generator=g)) == pytest.approx(1.0, abs=0.05)
    assert embedding_std(torch.ones(64, 32) + 1e-6 * torch.randn(64, 32, generator=g)) < 1e-3


def test_target_stats_on_uniform_one_hot_and_single_prototype_targets():
    k = 8
    uniform = torch.full((16, k), 1 / k)
    s = target_stats(uniform)
    assert s["target_entropy"] == pytest.approx(1.0) and s["mean_entropy"] == pytest.approx(1.0)
    assert s["target_top"] == pytest.approx(1 / k)
    onehot = torch.eye(k).repeat(2, 1)                     # confident, every prototype used
    s = target_stats(onehot)
    assert s["target_entropy"] == pytest.approx(0.0, abs=1e-6) and s["mean_entropy"] == pytest.approx(1.0)
    assert s["proto_usage"] == 1.0 and s["target_top"] == 1.0
    one = torch.zeros(16, k).index_fill_(1, torch.tensor([3]), 1.0)   # every sample on prototype 3
    s = target_stats(one)
    assert s["mean_entropy"] == pytest.approx(0.0, abs=1e-6) and s["proto_usage"] == pytest.approx(1 / k)


def test_health_stats_reads_what_the_method_recorded():
    z = torch.randn(32, 8)
    p = torch.softmax(torch.randn(32, 5), -1)
    h = torch.randn(4, 10, 8)
    out = health_stats({"embeddings": z, "target_probs": p, "target_repr": h})
    assert set(out) == {"rank", "emb_std", "target_entropy", "mean_entropy", "target_top", "proto_usage", "target_std"}
    assert out["target_std"] == pytest.approx(float(h.reshape(-1, 8).std(0).mean()))
    assert health_stats({}) == {}


def test_monitor_warns_once_after_the_signature_persists():
    mon = HealthMonitor(total_steps=100, patience=3, warmup=0.1)
    near_uniform = {"target_entropy": 1 - 0.05 / math.log(64), "rank": 10.0}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert mon.update(5, near_uniform, 64) == []            # in the warm-up: ignored
        assert mon.update(20, near_uniform, 64) == []
        assert mon.update(30, {"target_entropy": 0.5, "rank": 10.0}, 64) == []   # streak broken
        for s in (40, 50):
            assert mon.update(s, near_uniform, 64) == []
        issued = mon.update(60, near_uniform, 64)
        assert len(issued) == 1 and "uniform_targets" in issued[0] and "temperature" in issued[0]
        assert mon.update(70, near_uniform, 64) == []            # once
    assert len([x for x in w if issubclass(x.category, RuntimeWarning)]) == 1
    assert "uniform_targets" in mon.summary()
    healthy = HealthMonitor(total_steps=100)
    for s in range(20, 100, 10):
        assert healthy.update(s, {"target_entropy": 0.6, "rank": 12.0}, 64) == []
    assert "no collapse signature" in healthy.summary()
