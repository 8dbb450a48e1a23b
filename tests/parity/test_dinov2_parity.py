"""DINOv2 pieces against the official code: DINO head, DINO loss (centering with the lazy update,
Sinkhorn), iBOT loss, KoLeo and the iBOT mask generator. Generic over every ``dinov2_*`` fixture
(the ViT backbone fixtures are read by ``test_vit_parity.py``)."""
import random

import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.data.masks import IBOTMaskGenerator
from visrep.losses.dino import (
    Centering,
    dino_loss,
    ibot_loss,
    ibot_loss_dense,
    koleo_loss,
    koleo_nn_index,
    sinkhorn_teacher,
)
from visrep.models.heads import DINOHead


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_dino_head"))
def test_dino_head(path):
    fx = load_fixture(path)
    cfg = dict(fx.config["DINOHead"])
    assert not cfg.pop("use_bn", False), "BatchNorm heads are not supported"
    head = DINOHead(**cfg).double()
    head.load_state_dict(fx.prefixed("state."), strict=True)
    x, probe = fx.tensors["in.x"], fx.tensors["in.grad_probe"]
    y = head(x)
    fx.assert_close("out.y", y)
    fx.assert_close("out.x_mlp_normalized", head.bottleneck(x))
    fx.assert_close("out.last_layer_effective_weight", head.last_layer.weight)
    (y * probe).sum().backward()
    for name, p in head.named_parameters():
        fx.assert_close(f"out.grad.{name}", p.grad)


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_dino_loss"))
def test_dino_loss(path):
    fx = load_fixture(path)
    c = fx.config
    temp_s, temp_t, m = c["DINOLoss"]["student_temp"], c["teacher_temp"], c["DINOLoss"]["center_momentum"]
    n_g, n_l, B = c["n_global_crops"], c["n_local_crops"], c["batch_size"]
    T = fx.tensors
    center0 = T["in.center0"]
    centering = Centering(center0.shape[-1], momentum=m).double()
    centering.center.copy_(center0.reshape(1, -1))

    t1 = centering.softmax(T["in.teacher_step1"], temp_t)
    fx.assert_close("out.teacher_softmax_step1", t1)
    centering.update(T["in.teacher_step1"])
    fx.assert_close("out.center_pending_not_applied", centering.center.reshape(center0.shape))  # lazy
    t2 = centering.softmax(T["in.teacher_step2"], temp_t)
    fx.assert_close("out.teacher_softmax_step2", t2)
    fx.assert_close("out.center_after_update1", centering.center.reshape(center0.shape))
    centering.update(T["in.teacher_step2"])
    centering.apply_pending()
    fx.assert_close("out.center_after_update2", centering.center.reshape(center0.shape))

    n_terms = (n_g - 1) * n_g + max(n_l * n_g, 1)
    sg = T["in.student_global"].clone().requires_grad_(True)
    sl = T["in.student_local"].clone().requires_grad_(True)
    loss_g = dino_loss(sg, t2, temp_s)
    loss_l = dino_loss(sl.chunk(n_l), t2.view(n_g, B, -1).unbind(0), temp_s)
    fx.assert_close("out.loss_global_raw", loss_g)
    fx.assert_close("out.loss_local_raw", loss_l)
    fx.assert_close("out.loss_global_scaled", loss_g * 2 / n_terms)
    fx.assert_close("out.loss_local_scaled", loss_l / n_terms)
    loss_g.backward()
    loss_l.backward()
    fx.assert_close("out.grad.loss_global_raw.student_global", sg.grad)
    fx.assert_close("out.grad.loss_local_raw.student_local", sl.grad)

    for key, inp, iters in (("out.sinkhorn_iter3", "in.teacher_step1", 3),
                            ("out.sinkhorn_iter5", "in.teacher_step2", 5)):
        if key in T:
            fx.assert_close(key, sinkhorn_teacher(T[inp], temp_t, iters))


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_ibot_loss"))
def test_ibot_loss(path):
    fx = load_fixture(path)
    c, T = fx.config, fx.tensors
    temp_s, temp_t = c["iBOTPatchLoss"]["student_temp"], c["teacher_temp"]
    masks = T["in.collated_masks"]
    n = int(T["in.n_masked_patches"][0])
    assert n == int(masks.sum()) and torch.equal(masks.flatten().nonzero().flatten(), T["in.mask_indices_list"])

    center0 = T["in.center0"]
    centering = Centering(center0.shape[-1], momentum=c["iBOTPatchLoss"]["center_momentum"]).double()
    centering.center.copy_(center0.reshape(1, -1))
    t1 = centering.softmax(T["in.teacher_masked_step1"], temp_t)
    fx.assert_close("out.teacher_softmax_step1", t1)
    centering.update(T["in.teacher_masked_step1"])
    t2 = centering.softmax(T["in.teacher_masked_step2"], temp_t)
    fx.assert_close("out.center_after_update1", centering.center.reshape(center0.shape))
    fx.assert_close("out.teacher_softmax_step2", t2)

    s = T["in.student_masked"].clone().requires_grad_(True)
    loss = ibot_loss(s, t1, masks, temp_s, weights=T["in.masks_weight"])
    fx.assert_close("out.loss_masked_train_path", loss)
    loss.backward()
    fx.assert_close("out.grad.loss_masked_train_path.student_masked", s.grad)
    fx.assert_close("out.loss_masked_weight_none", ibot_loss(T["in.student_masked"], t1, masks, temp_s))
    if "in.student_pad_rows" in T:
        s_pad = torch.cat([T["in.student_masked"], T["in.student_pad_rows"]])
        t_pad = torch.cat([t1, T["in.teacher_pad_rows"]])
        fx.assert_close("out.loss_masked_padded_upperbound",
                        ibot_loss(s_pad, t_pad, masks, temp_s, weights=T["in.masks_weight"]))

    sf = T["in.student_full"].clone().requires_grad_(True)
    dense = ibot_loss_dense(sf, T["in.teacher_full_softmaxed"], masks, temp_s)
    fx.assert_close("out.loss_forward_full", dense)
    dense.backward()
    fx.assert_close("out.grad.loss_forward_full.student_full", sf.grad)
    if "out.sinkhorn_iter3" in T:
        fx.assert_close("out.sinkhorn_iter3", sinkhorn_teacher(T["in.teacher_masked_step1"], temp_t, 3))


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_koleo_loss"))
def test_koleo_loss(path):
    fx = load_fixture(path)
    eps = fx.config.get("eps", 1e-8)
    for i in range(len(fx.config["cases"])):
        x = fx.tensors[f"in.case{i}.x"].clone().requires_grad_(True)
        idx = koleo_nn_index(torch.nn.functional.normalize(x.detach(), eps=eps, dim=-1))
        fx.assert_close(f"out.case{i}.nn_index", idx)
        loss = koleo_loss(x, eps=eps)
        fx.assert_close(f"out.case{i}.loss", loss)
        loss.backward()
        fx.assert_close(f"out.case{i}.grad_x", x.grad)
        usage = 0.1 * sum(koleo_loss(p, eps=eps) for p in x.detach().chunk(2))
        fx.assert_close(f"out.case{i}.ssl_usage_w0.1_chunk2", usage)


def _generator(cfg: dict) -> IBOTMaskGenerator:
    kw = cfg["MaskingGenerator_kwargs"]
    ck = cfg["collate_kwargs"]
    max_aspect = kw.get("max_aspect")
    return IBOTMaskGenerator(tuple(kw["input_size"]), ratio=tuple(ck["mask_ratio_tuple"]),
                             mask_probability=ck["mask_probability"], max_num_patches=cfg["max_num_patches_value"],
                             min_num_patches=kw.get("min_num_patches", 4), min_aspect=kw.get("min_aspect", 0.3),
                             max_aspect=max_aspect if isinstance(max_aspect, (int, float)) else None)


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_mask_collate"))
def test_mask_collate(path):
    fx = load_fixture(path)
    cfg = fx.config
    gen = _generator(cfg)
    n = cfg["n_global_crops"] * cfg["batch_size"]
    rng = random.Random(cfg["python_random_seed"])
    out = [gen.sample(n, rng) for _ in range(cfg["n_batches"])]
    k = 0
    while f"out.exact.batch{k}.collated_masks" in fx.tensors:
        pre = f"out.exact.batch{k}."
        fx.assert_close(pre + "collated_masks", out[k]["masks"])
        fx.assert_close(pre + "mask_indices_list", out[k]["indices"])
        fx.assert_close(pre + "masks_weight", out[k]["weights"])
        assert out[k]["upperbound"] == int(fx.tensors[pre + "upperbound"])
        assert out[k]["indices"].numel() == int(fx.tensors[pre + "n_masked_patches"][0])
        k += 1
    assert k > 0
    # every batch of the run (same python-random protocol): counts and upper bounds
    counts = torch.stack([o["masks"].sum(-1) for o in out])
    assert torch.equal(counts, fx.tensors["out.masked_count"])
    assert torch.equal(torch.tensor([o["upperbound"] for o in out]), fx.tensors["out.upperbound"])
    assert torch.equal(torch.tensor([int(o["masks"].sum()) for o in out]), fx.tensors["out.n_masked_patches"])


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_mask_collate"))
def test_mask_collate_distribution(path):
    """Independent of the python-random protocol: the masked-count distribution over fresh seeds
    matches the official summary within 4 combined standard errors."""
    fx = load_fixture(path)
    cfg, summary = fx.config, fx.meta["summary"]
    gen = _generator(cfg)
    n = cfg["n_global_crops"] * cfg["batch_size"]
    rng = random.Random(12345)
    totals = torch.tensor([int(gen.sample(n, rng)["masks"].sum()) for _ in range(200)], dtype=torch.float64)
    want = summary["n_masked_patches_per_batch"]
    se = (want["stderr_of_mean"] ** 2 + (totals.std() / totals.numel() ** 0.5) ** 2) ** 0.5
    assert abs(float(totals.mean()) - want["mean"]) < 4 * float(se)
