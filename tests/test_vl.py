"""CLIP / SigLIP / Llip: the K = 1 reduction, losses against their formulas, the chunked mixer,
retrieval metrics, caption datasets and the zeroshot / retrieval protocols through the runner."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visrep.config import load_config
from visrep.losses.contrastive import clip_loss, llip_logits, siglip_loss
from visrep.methods import build_method
from visrep.runner import data_info, load_split

CONFIGS = Path(__file__).resolve().parents[1] / "visrep" / "configs"


def tiny(name: str, tmp_path, *overrides):
    cfg = load_config(CONFIGS / name / "tiny.yaml", [f"train.out_dir={tmp_path}", *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, data_info(cfg, load_split(cfg, "train"))).double()


def batch_of(method, n=6, seed=0):
    ds = load_split(method.run_cfg, "train")
    images = ds.tensors()[0][:n]
    b = {"image": images, "label": torch.zeros(n, dtype=torch.long), "index": torch.arange(n),
         "caption": [ds.captions(i) for i in range(n)]}
    b = method.prepare_batch(b, torch.Generator().manual_seed(seed))
    return b["image"].double(), b["text"]


def test_llip_with_one_token_is_siglip_on_that_tokens_projection(tmp_path):
    """K = 1: the softmax weight is 1 whatever the caption, so Llip is SigLIP with image embedding
    normalize(s_1 W_v W_o) -- checked against the SigLIP *method* given the same weights."""
    _, llip = tiny("llip", tmp_path / "l", "method.num_mixture_tokens=1")
    _, siglip = tiny("siglip", tmp_path / "s")
    images, text = batch_of(llip)
    state = {k: v for k, v in llip.state_dict().items() if k.startswith(("visual.", "text.", "logit_"))}
    state["visual.cls_token"] = state.pop("visual.register_tokens")  # same row of the position table
    state["image_projection"] = llip.mixer.v_proj[0] @ llip.mixer.out_proj
    with torch.no_grad():
        llip.logit_bias.fill_(-3.0)
        llip.logit_scale.fill_(2.0)
    state.update(logit_bias=llip.logit_bias.detach().clone(), logit_scale=llip.logit_scale.detach().clone())
    siglip.load_state_dict(state, strict=True)
    a, b = llip.objective(images, text), siglip.objective(images, text)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert llip.mixer.q_proj.grad.abs().max() == 0          # the query cannot matter
    for name, p in siglip.named_parameters():
        if name.startswith(("text.", "visual.blocks", "logit_")):
            q = dict(llip.named_parameters())[name]
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # and with K > 1 the caption does matter
    _, llip4 = tiny("llip", tmp_path / "l4")
    llip4.objective(images, text).backward()
    assert llip4.mixer.q_proj.grad.abs().max() > 0


def test_llip_pass_all_tokens_with_several_mixture_tokens(tmp_path):
    """``pass_all_tokens`` with K > 1 (the official tower can only run it on CMP's proj=None path): every
    output token, the K mixture tokens and the patches, is a mixture token with its own key / value matrix,
    and each of them gets a gradient."""
    _, llip = tiny("llip", tmp_path, "method.pass_all_tokens=true", "method.num_mixture_tokens=3")
    images, text = batch_of(llip)
    tokens = llip.mixture_tokens(images)
    n = 3 + (images.shape[-1] // llip.run_cfg.model.patch_size) ** 2
    assert tokens.shape == (images.shape[0], n, llip.run_cfg.model.embed_dim) and llip.mixer.k_proj.shape[0] == n
    loss = llip.objective(images, text)
    loss.backward()
    assert torch.isfinite(loss)
    for w in (llip.mixer.k_proj, llip.mixer.v_proj):
        assert (w.grad.flatten(1).abs().amax(dim=1) > 0).all()


def test_llip_chunked_logits_equal_full():
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(5, 2, 3, 4, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 4, generator=g,
                                                                                  dtype=torch.float64)
    Q = torch.randn(7, 2, 4, generator=g, dtype=torch.float64)
    zt = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    W = torch.randn(8, 8, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (K, Q, V, zt, W)]
    full = llip_logits(*leaves[:4], leaves[4], 5.0, 3.0, -1.0)
    (full.sin().sum()).backward()
    want = [t.grad.clone() for t in leaves]
    leaves = [t.clone().requires_grad_(True) for t in (K, Q, V, zt, W)]
    chunked = llip_logits(*leaves[:4], leaves[4], 5.0, 3.0, -1.0, chunk=3)
    (chunked.sin().sum()).backward()
    torch.testing.assert_close(chunked, full)
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad, w)


def test_clip_and_siglip_losses_against_their_formulas():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    logits = s * img @ txt.T
    ce = lambda x: -(x.diag() - x.logsumexp(dim=1)).mean()  # noqa: E731
    torch.testing.assert_close(clip_loss(img, txt, s), (ce(logits) + ce(logits.T)) / 2)
    z = 2 * torch.eye(4, dtype=torch.float64) - 1
    want = -sum(math.log(1 / (1 + math.exp(-float(z[i, j] * (logits[i, j] + b))))) for i in range(4) for j in range(4))
    torch.testing.assert_close(siglip_loss(img, txt, s, b), torch.tensor(want / 4, dtype=torch.float64))


def test_recall_at_k():
    from visrep.eval.retrieval import recall_at_k

    # 3 images, 4 captions (image 0 owns captions 0 and 1)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0],
                           [0.8, 0.2, 0.7, 0.1],
                           [0.1, 0.3, 0.2, 0.4]])
    r = recall_at_k(scores, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(100 * 2 / 3)   # image 1's best text is caption 0 (image 0's)
    assert r["i2t_r2"] == pytest.approx(100.0)
    # captions 0, 2, 3 find their image first; caption 1 scores its image 0.1 < 0.2 < 0.3: rank 3
    assert r["t2i_r1"] == r["t2i_r2"] == pytest.approx(75.0)
    assert r["t2i_r3"] == pytest.approx(100.0)


def _png(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_caption_datasets(tmp_path):
    from visrep.data.captions import TarCaptions, TemplateCaptions, caption_csv, coco_captions
    from visrep.data.procedural import ProceduralShapes

    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "b.png").write_bytes(_png((0, 255, 0)))
    (tmp_path / "train.csv").write_text("filepath\ttitle\na.png\ta red thing\nb.png\ta green thing\n"
                                        "a.png\tred again\n")
    ds = caption_csv(tmp_path / "train.csv")
    assert len(ds) == 2 and ds.captions(0) == ["a red thing", "red again"]
    img, label = ds[0]
    assert img.shape == (3, 6, 8) and img.dtype == torch.uint8 and int(img[0, 0, 0]) == 255 and label == -1
    ann = {"images": [{"id": 7, "file_name": "b.png"}, {"id": 3, "file_name": "a.png"}],
           "annotations": [{"image_id": 7, "caption": "green"}, {"image_id": 3, "caption": "red"},
                           {"image_id": 7, "caption": "a green square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    coco = coco_captions(tmp_path / "ann.json", tmp_path)
    assert [coco.captions(i) for i in range(2)] == [["red"], ["green", "a green square"]]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, data in (("000.png", _png((0, 0, 255))), ("000.txt", b"blue\na blue box\n"),
                          ("001.png", _png((9, 9, 9))), ("001.json", json.dumps({"caption": "dark"}).encode())):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    wds = TarCaptions([tmp_path / "s.tar"])
    assert [wds.captions(i) for i in range(2)] == [["blue", "a blue box"], ["dark"]]
    assert int(wds[0][0][2, 0, 0]) == 255
    shapes = TemplateCaptions(ProceduralShapes(num_samples=4, image_size=16), ["a {}", "a photo of a {}"])
    label = shapes.tensors()[1][2]
    assert shapes.captions(2) == [f"a {shapes.classes[label]}", f"a photo of a {shapes.classes[label]}"]


def _zeroshot_by_hand(method, images, labels, classes, templates):
    """Top-1 / top-5 from the method's own contract calls, written out here (not visrep.eval)."""
    img = method.encode_images(images)
    per_class = []
    for c in classes:
        names = [c] if isinstance(c, str) else list(c)
        states = method.encode_text([t.format(n) for t in templates for n in names])
        mean = {k: v.mean(dim=0) for k, v in states.items()}
        mean["zt"] = F.normalize(mean["zt"], dim=-1)
        per_class.append(mean)
    scores = method.similarity(img, {k: torch.stack([c[k] for c in per_class]) for k in per_class[0]})
    top5 = scores.topk(5, dim=1).indices
    return {"top1": 100.0 * (scores.argmax(dim=1) == labels).double().mean().item(),
            "top5": 100.0 * (top5 == labels[:, None]).any(dim=1).double().mean().item()}


def _retrieval_by_hand(method, images, captions):
    texts = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    scores = method.similarity(method.encode_images(images), method.encode_text(texts))
    out = {}
    for k in (1, 5, 10):
        best = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
        out[f"i2t_r{k}"] = 100.0 * sum(any(owner[j] == i for j in row) for i, row in enumerate(best)) / len(best)
        best = scores.T.topk(min(k, scores.shape[0]), dim=1).indices.tolist()
        out[f"t2i_r{k}"] = 100.0 * sum(owner[t] in row for t, row in enumerate(best)) / len(best)
    return out


def test_zeroshot_and_retrieval_protocols_through_the_runner(tmp_path):
    """The runner's zero-shot and retrieval numbers for a checkpoint are the ones its weights give on the
    test split (class prompts = templates x class names, mean text state per class; every test image's
    captions for retrieval), recomputed here from the trained method's own encode / similarity calls; and
    the untrained towers give other numbers, so evaluating the wrong weights, split, labels, prompts or
    caption owners fails."""
    from visrep.engine import train
    from visrep.runner import evaluate_checkpoint

    n_retrieval = 20
    cfg = load_config(CONFIGS / "llip" / "tiny.yaml", [f"train.out_dir={tmp_path}", "train.max_steps=2",
                                                       f"eval.retrieval_samples={n_retrieval}"])
    torch.manual_seed(0)
    ds = load_split(cfg, "train")
    method = build_method(cfg, data_info(cfg, ds))
    untrained = method.random_init_baseline()
    result = train(cfg, method, ds)
    out, table = evaluate_checkpoint([result.checkpoint], protocols=["zeroshot", "retrieval"],
                                     out_dir=str(tmp_path / "eval"))
    values = out["method_protocols"]
    zs = next(v for k, v in values.items() if k.startswith("zeroshot/"))
    rt = next(v for k, v in values.items() if k.startswith("retrieval/"))
    assert zs["chance"] == pytest.approx(100 / 6)
    assert "zero-shot" in table and "retrieval" in table

    test = load_split(cfg, "test")
    images, labels = test.tensors()
    classes = method.data_info.classes or test.classes
    templates = cfg.eval.zeroshot_templates or test.templates
    captions = [test.captions(i) for i in range(min(n_retrieval, len(images)))]
    want = {}
    for name, m in (("trained", method), ("untrained", untrained)):
        m.eval()
        with torch.no_grad():
            want[name] = {**_zeroshot_by_hand(m, images, labels, classes, templates),
                          **_retrieval_by_hand(m, images[:len(captions)], captions)}
    got = {**{k: zs[k] for k in ("top1", "top5")}, **{k: rt[k] for k in want["trained"] if k in rt}}
    assert set(got) == set(want["trained"])
    assert got == pytest.approx(want["trained"], abs=1e-9)
    assert want["untrained"] != pytest.approx(want["trained"], abs=1e-9), \
        "the untrained towers score the same: this test could not tell the checkpoint from them"


def test_open_clip_towers_load_into_ours():
    """open_clip's own (installed) vision and text towers, randomly initialised and perturbed, give the
    same outputs as ours after ``clip_vision_state`` / ``clip_text_state`` (official key names in)."""
    import open_clip.transformer as oc

    from visrep.hub import clip_text_state, clip_vision_state, clip_vit
    from visrep.models.text import TextTransformer

    torch.manual_seed(0)
    vision = oc.VisionTransformer(16, 4, 32, 2, 2, 4.0, output_dim=16, act_layer=oc.QuickGELU).double().eval()
    text = oc.TextTransformer(8, 30, 32, 2, 2, output_dim=16, act_layer=oc.QuickGELU).double().eval()
    with torch.no_grad():
        for p in list(vision.parameters()) + list(text.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    vstate, proj = clip_vision_state(vision.state_dict())
    ours_v = clip_vit(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                      class_token=True).double().eval()
    ours_v.load_state_dict(vstate, strict=True)
    ours_t = TextTransformer(vocab_size=30, context_length=8, width=32, depth=2, num_heads=2, embed_dim=16).double()
    ours_t.load_state_dict(clip_text_state({k: v for k, v in text.state_dict().items() if k != "attn_mask"}),
                           strict=True)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    tokens = torch.tensor([[28, 5, 7, 29, 0, 0, 0, 0], [28, 3, 29, 0, 0, 0, 0, 0], [28, 1, 2, 3, 4, 5, 6, 29]])
    with torch.no_grad():
        torch.testing.assert_close(ours_v(images)[:, 0] @ proj, vision(images), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours_t(tokens), text(tokens), rtol=1e-10, atol=1e-10)


def test_open_clip_model_state_dict_gives_our_towers():
    """A whole open_clip ``CLIP`` state dict (as a pretrained checkpoint holds it) -> our two towers."""
    import open_clip.model as ocm

    from visrep.hub import open_clip_towers

    torch.manual_seed(1)
    model = ocm.CLIP(16, dict(image_size=16, layers=2, width=32, patch_size=4, head_width=16),
                     dict(context_length=8, vocab_size=30, width=32, heads=2, layers=1), quick_gelu=True)
    model = model.double().eval()
    vision, proj, text = open_clip_towers(model.state_dict(), vision_head_width=16, text_head_width=16,
                                          act_layer="quick_gelu")
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tokens = torch.tensor([[28, 5, 7, 29, 0, 0, 0, 0], [28, 1, 2, 3, 4, 5, 6, 29]])
    with torch.no_grad():
        torch.testing.assert_close(vision(images)[:, 0] @ proj, model.encode_image(images), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(text(tokens), model.encode_text(tokens), rtol=1e-10, atol=1e-10)


def test_grad_checkpointing_changes_nothing(tmp_path):
    _, plain = tiny("llip", tmp_path / "a")
    _, ckpt = tiny("llip", tmp_path / "b", "model.grad_checkpointing=true")
    assert ckpt.visual.grad_checkpointing and ckpt.text.grad_checkpointing
    images, text = batch_of(plain)
    a, b = plain.objective(images, text), ckpt.objective(images, text)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)
