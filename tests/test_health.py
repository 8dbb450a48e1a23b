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
    for z in (spread, two, torch.randn(8, 16, generator=g)):  # the Gram route equals RankMe from the SVD
        s = torch.linalg.svdvals(z.double())
        p = s / s.sum() + 1e-7
        assert effective_rank(z) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    bad = spread.clone()
    bad[3, 4] = float("nan")
    assert math.isnan(effective_rank(bad))  # no LinAlgError in the middle of a run: NaN, as the loss shows


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


def _run(name: str, tmp_path, *overrides: str, hook=None):
    from pathlib import Path

    from visrep.config import load_config
    from visrep.engine import train
    from visrep.methods import build_method
    from visrep.runner import data_info, load_split

    cfg = load_config(Path(__file__).resolve().parents[1] / "visrep" / "configs" / name / "tiny.yaml",
                      [f"train.out_dir={tmp_path / name}", "train.max_steps=8", "train.epochs=1",
                       "data.train_subset=64", "train.batch_size=8", *overrides])
    ds = load_split(cfg, "train")
    torch.manual_seed(0)
    method = build_method(cfg, data_info(cfg, ds))
    if hook is not None:
        hook(method)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        result = train(cfg, method, ds)
    collapse = [str(x.message) for x in w if "collapse signature" in str(x.message)]
    return result, collapse


def test_prototype_family_uniform_targets_warn_and_sharp_targets_do_not(tmp_path):
    """DINOv2: a teacher temperature of 100 makes its targets uniform (no signal): warned once, the
    signal and the remedy named; the recipe's 0.04 -> 0.07 does not warn. Both runs log the signals."""
    # LayerScale 1e-5 (the tiny recipe) keeps every image's [CLS] the same for the first steps (rank 1,
    # rightly flagged): 0.5 lets the tiny run's embeddings differ from the start
    ls = "model.init_values=0.5"
    result, collapse = _run("dinov2", tmp_path / "hot", ls, "method.teacher_temp=100", "method.warmup_teacher_temp=100")
    assert len(collapse) == 1 and "uniform_targets" in collapse[0] and "temperature" in collapse[0]
    assert {"rank", "emb_std", "target_entropy", "mean_entropy", "target_top", "proto_usage"} <= set(result.history[-1])
    assert result.history[-1]["target_entropy"] > 0.99 and "uniform_targets" in result.health
    result, collapse = _run("dinov2", tmp_path / "sharp", ls)
    assert collapse == [] and result.history[-1]["target_entropy"] < 0.98 and "no collapse" in result.health


def test_jepa_family_collapsed_predictions_warn_and_healthy_ones_do_not(tmp_path):
    """I-JEPA: a predictor whose output projection is zero (and stays: lr 0) predicts one vector for
    every token (rank 1): warned; the tiny recipe's run keeps a rank above 2 and logs the target std."""

    def collapse_predictor(method):
        proj = method.predictor.predictor_proj
        torch.nn.init.zeros_(proj.weight)

    result, collapse = _run("ijepa", tmp_path / "dead", "optim.lr=0", "optim.start_lr=0", "optim.final_lr=0",
                            hook=collapse_predictor)
    assert len(collapse) == 1 and "low_rank" in collapse[0] and result.history[-1]["rank"] < 1.5
    result, collapse = _run("ijepa", tmp_path / "live")
    assert collapse == [] and result.history[-1]["rank"] > 2 and result.history[-1]["target_std"] > 0


@pytest.mark.requires("matplotlib")
def test_a_run_ends_with_a_plot_of_its_losses_lr_and_health(tmp_path):
    from visrep.engine.plots import read_metrics

    result, _ = _run("msn", tmp_path / "plot")
    png = tmp_path / "plot" / "msn" / "train.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(tmp_path / "plot" / "msn" / "metrics.jsonl")
    assert len(rows) == 8 and {"loss", "me_max", "lr", "rank", "target_entropy"} <= set(rows[-1])
    _, _ = _run("msn", tmp_path / "noplot", "train.plot=false")
    assert not (tmp_path / "noplot" / "msn" / "train.png").exists()
