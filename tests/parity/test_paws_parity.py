"""PAWS loss and labels matrix match the official suncet code (every ``paws_*`` fixture)."""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.losses import paws_labels_matrix, paws_loss, sharpen, snn


@pytest.mark.parametrize("path", fixtures_of_kind("paws_labels_matrix"))
def test_paws_labels_matrix(path):
    fx = load_fixture(path)
    for i, case in enumerate(fx.config["cases"]):
        got = paws_labels_matrix(case["num_classes"], case["s_batch_size"], case["world_size"],
                                 unique_classes=case["unique_classes"], smoothing=case["smoothing"])
        fx.assert_close(f"out.case{i}.labels", got)


@pytest.mark.parametrize("path", fixtures_of_kind("paws_loss"))
def test_paws_loss(path):
    fx = load_fixture(path)
    cfg, t = fx.config, fx.tensors
    lc, mk = cfg["init_paws_loss"], cfg["make_labels_matrix"]
    labels = paws_labels_matrix(mk["num_classes"], mk["s_batch_size"], mk["world_size"],
                                unique_classes=mk["unique_classes"], smoothing=mk["smoothing"])
    fx.assert_close("out.labels_matrix_f32", labels)
    tau, T, mc = lc["tau"], lc["T"], lc["multicrop"]
    anchor_probs = snn(t["in.anchor_views"], t["in.anchor_supports"], t["in.anchor_support_labels"], tau)
    fx.assert_close("out.snn_anchor", anchor_probs)
    target_probs = snn(t["in.target_views"], t["in.target_supports"], t["in.target_support_labels"], tau)
    fx.assert_close("out.snn_target", target_probs)
    fx.assert_close("out.sharpen_snn_target", sharpen(target_probs, T))
    fx.assert_close("out.sharpen_snn_anchor", sharpen(fx.tensors["out.snn_anchor"], T))

    weight = 1.0 if lc["me_max"] else 0.0
    for term in ("ploss", "rloss"):
        views = t["in.anchor_views"].clone().requires_grad_(True)
        sups = t["in.anchor_supports"].clone().requires_grad_(True)
        out = paws_loss(views, sups, t["in.anchor_support_labels"], t["in.target_views"], t["in.target_supports"],
                        t["in.target_support_labels"], tau=tau, T=T, multicrop=mc, me_max_weight=weight)
        value = out["ce"] if term == "ploss" else weight * out["me_max"]
        fx.assert_close(f"out.{term}", value.detach().reshape(()))
        if f"out.grad.{term}.anchor_views" not in t:
            continue
        value.backward()
        fx.assert_close(f"out.grad.{term}.anchor_views", views.grad)
        fx.assert_close(f"out.grad.{term}.anchor_supports", sups.grad)
    total = out["loss"].detach()
    torch.testing.assert_close(total, (t["out.ploss"] + t["out.rloss"]).reshape(()), atol=1e-12, rtol=1e-10)
