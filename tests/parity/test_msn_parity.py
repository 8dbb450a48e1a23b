"""MSN pieces match the official facebookresearch/msn code (every ``msn_loss``,
``msn_projection_head`` and ``msn_vit_patch_drop`` fixture; ``msn_sinkhorn`` is in
test_sinkhorn_parity.py)."""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.losses import msn_loss, sharpen, smoothed_one_hot, snn


@pytest.mark.parametrize("path", fixtures_of_kind("msn_loss"))
def test_msn_loss(path):
    fx = load_fixture(path)
    cfg, t = fx.config, fx.tensors
    init, call = cfg["init_msn_loss"], cfg["loss_call"]
    k = cfg["num_proto"]
    labels = smoothed_one_hot(torch.arange(k), k, cfg["label_smoothing"], dtype=torch.float64)
    fx.assert_close("in.proto_labels", labels)
    tau, T = init["tau"], call["T"]
    fx.assert_close("out.snn_anchor", snn(t["in.anchor_views"], t["in.prototypes"], labels, tau))
    fx.assert_close("out.sharpen_snn_target", sharpen(snn(t["in.target_views"], t["in.prototypes"], labels, tau), T))
    me_w = 1.0 if init["me_max"] else 0.0
    ent_w = 1.0 if call["use_entropy"] else 0.0
    for term, key in (("ploss", "ce"), ("rloss", "me_max"), ("sloss", "entropy")):
        anchors = t["in.anchor_views"].clone().requires_grad_(True)
        protos = t["in.prototypes"].clone().requires_grad_(True)
        out = msn_loss(anchors, t["in.target_views"], protos, tau=tau, T=T, proto_labels=labels,
                       me_max_weight=me_w, entropy_weight=ent_w, use_sinkhorn=call["use_sinkhorn"])
        weight = {"ploss": 1.0, "rloss": me_w, "sloss": ent_w}[term]
        value = weight * out[key]
        fx.assert_close(f"out.{term}", value.detach().reshape(()))
        if f"out.grad.{term}.anchor_views" in t:
            value.backward()
            fx.assert_close(f"out.grad.{term}.anchor_views", anchors.grad)
            fx.assert_close(f"out.grad.{term}.prototypes", protos.grad)
    fx.assert_close("out.targets", out["targets"])
    for name in ("np", "max_t", "min_t"):
        fx.assert_close(f"out.log.{name}", out[name].reshape(()))


@pytest.mark.parametrize("path", fixtures_of_kind("msn_projection_head"))
def test_msn_projection_head(path):
    from visrep.models.projection import ProjectionHead

    fx = load_fixture(path)
    c = fx.config["init_model"]
    state = fx.prefixed("state.")
    x, probe = fx.tensors["in.x"], fx.tensors["in.probe"]

    def head():
        h = ProjectionHead(c["emb_dim"], c["hidden_dim"], c["output_dim"], use_bn=c["use_bn"]).double()
        h.load_state_dict(state, strict=True)
        return h

    fx.assert_close("out.eval.y", head().eval()(x).detach())
    h = head().train()
    xg = x.clone().requires_grad_(True)
    y = h(xg)
    fx.assert_close("out.train.y", y.detach())
    (y * probe).sum().backward()
    fx.assert_close("out.train.grad.x", xg.grad)
    for name, p in h.named_parameters():
        fx.assert_close(f"out.train.grad.{name}", p.grad)
    buffers = dict(h.named_buffers())
    for key in fx.prefixed("out.train.buffers_after."):
        fx.assert_close(f"out.train.buffers_after.{key}", buffers[key])


@pytest.mark.parametrize("path", fixtures_of_kind("msn_vit_patch_drop"))
def test_msn_vit_patch_drop(path):
    from visrep.models import VisionTransformer, encode_views

    fx = load_fixture(path)
    kw = fx.config["kwargs"]
    vit = VisionTransformer(img_size=kw["img_size"][0], patch_size=kw["patch_size"], in_chans=3,
                            embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
                            mlp_ratio=kw["mlp_ratio"], qkv_bias=kw["qkv_bias"], pos_embed="learned",
                            class_token=True, interpolate_offset=0.0, interpolate_float32=False).double()
    vit.load_state_dict(fx.prefixed("state."), strict=True)
    views = fx.listed("in.x")
    B = views[0].shape[0]

    def keep(name):  # the official kept token indices [0] + 1 + perm[:T] -> patch indices [B, T]
        kept = fx.tensors[f"in.rng.{name}.kept_idx"]
        assert kept[0] == 0
        return (kept[1:] - 1).expand(B, -1)

    with torch.no_grad():
        h = encode_views(vit, views, keep("multicrop"))
        fx.assert_close("out.multicrop.h", h)
        fx.assert_close("out.multicrop.z", h)
        fx.assert_close("out.nodrop.h", encode_views(vit, views, None))
        single = fx.tensors["in.x_single"]
        fx.assert_close("out.single.z", encode_views(vit, [single], keep("single")))
        fx.assert_close("out.single_nodrop.z", encode_views(vit, [single], None))


@pytest.mark.parametrize("path", fixtures_of_kind("msn_vit_patch_drop"))
def test_msn_kept_count(path):
    import re

    from visrep.methods.msn import num_kept

    fx = load_fixture(path)
    for name, key in (("multicrop", "multicrop_call"), ("single", "single_call")):
        p = float(re.search(r"patch_drop=([0-9.]+)", fx.config[key]).group(1))
        n = fx.tensors[f"in.rng.{name}.randperm"].numel()
        assert num_kept(n, p) + 1 == fx.tensors[f"in.rng.{name}.kept_idx"].numel()
