"""DiT diffusion and FID: adaLN-Zero starts as the identity, the forward process is the closed form,
sampling is a function of the seed, classifier-free guidance combines the two branches as it should,
the Frechet distance matches closed forms, ``visrep sample`` writes a PNG and ``visrep eval
--protocols fid`` reports a labelled domain FID."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.requires("diffusers")  # tests/conftest.py: a failure under CI=true

from visrep.config import ConfigError, load_config  # noqa: E402
from visrep.eval.fid import domain_feature_net, fid_from_features, frechet_distance  # noqa: E402
from visrep.methods import DataInfo, build_method  # noqa: E402
from visrep.methods.diffusion import classifier_free_guidance  # noqa: E402
from visrep.models.dit import DiT  # noqa: E402

INFO = DataInfo(in_chans=3, image_size=8, num_classes=6)


def tiny(*overrides: str, tmp_path=None):
    ov = list(overrides) + ([f"train.out_dir={tmp_path}"] if tmp_path is not None else [])
    return load_config("diffusion/tiny", ov)


def perturbed(method, seed: int = 0):
    """The method with every EMA / DiT weight randomised (a fresh DiT predicts exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (method.dit, method.ema):
            for p in module.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return method.eval()


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size,pos_embed", [(1, "learned"), (2, "sincos")])
def test_adaln_zero_blocks_start_as_identity(patch_size, pos_embed):
    torch.manual_seed(0)
    dit = DiT(img_size=8, patch_size=patch_size, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5,
              pos_embed=pos_embed)
    assert dit.grid == (8 // patch_size, 8 // patch_size)
    x, c = torch.randn(3, 64 // patch_size ** 2, 32), torch.randn(3, 32)
    for blk in dit.blocks:
        torch.testing.assert_close(blk(x, c), x, rtol=0, atol=0)
    images, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5])
    assert torch.equal(dit(images, t, y), torch.zeros_like(images))   # zero-initialised final layer
    with torch.no_grad():
        dit.blocks[0].adaLN_modulation[-1].bias.fill_(0.5)
    assert not torch.allclose(dit.blocks[0](x, c), x)                 # a trained gate opens the block


def test_dit_unpatchify_and_learn_sigma():
    dit = DiT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=1, num_heads=2, learn_sigma=True)
    assert dit.out_chans == 6 and dit.y_embedder is None
    tokens = torch.arange(16 * 24, dtype=torch.float32).reshape(1, 16, 24)
    img = dit.unpatchify(tokens)
    # token (row 1, col 2) holds pixels (2..3, 4..5) of every channel, channels last within a patch
    assert img.shape == (1, 6, 8, 8)
    assert img[0, 1, 2, 5] == tokens[0, 1 * 4 + 2, (0 * 2 + 1) * 6 + 1]


# -- the diffusion process -----------------------------------------------------------------------
def test_forward_process_matches_closed_form():
    cfg = tiny()
    method = build_method(cfg, INFO)
    m = cfg.method
    betas = torch.linspace(m.beta_start, m.beta_end, m.num_train_timesteps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 999])
    want = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(method.schedule.q_sample(x0, t, eps), want.float(), rtol=1e-5, atol=1e-5)
    # float64 inputs: the coefficients are float32-rounded (as the official code), nothing else
    got = method.schedule.q_sample(x0.double(), t, eps.double())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    assert got.dtype == torch.float64


def test_vb_term_vanishes_for_the_true_posterior_and_trains_only_the_variance():
    """KL(q || p) is 0 when the model's eps is the true noise and its variance the posterior's (v = -1), and
    grows with a wrong variance; at t = 0 the term is the decoder NLL; the eps channels get no vb gradient."""
    cfg = tiny()
    method = build_method(cfg, INFO).double()
    assert method.dit.out_chans == 6 and cfg.method.learn_sigma
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    s = method.schedule
    x_t = s.q_sample(x0, t, eps)
    vb = s.vb_terms(x0, x_t, t, eps, -torch.ones_like(x0))
    assert vb[1:].abs().max() < 1e-5 and vb[0] > 0                   # KL ~ 0 (float32 coefficients); t=0: NLL
    worse = s.vb_terms(x0, x_t, t, eps, torch.ones_like(x0))         # the beta_t end of the range
    assert (worse[1:] > vb[1:]).all()
    out = torch.zeros(4, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    s.vb_terms(x0, x_t, t, out[:, :3].detach(), out[:, 3:]).sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_prepare_batch_draws_from_the_generator_only():
    method = build_method(tiny(), INFO)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 3, 4, 5, -1, 0]), "index": torch.arange(8)}
    a = method.prepare_batch(dict(batch), torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG must not matter
    b = method.prepare_batch(dict(batch), torch.Generator().manual_seed(3))
    for k in ("x0", "noise", "timesteps", "labels"):
        assert torch.equal(a[k], b[k]), k
    assert a["x0"].min() >= -1 and a["x0"].max() <= 1
    assert a["labels"][6] == method.dit.null_class                     # unknown label -> null class


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_for_a_seed(sampler):
    method = perturbed(build_method(tiny(f"method.sampler={sampler}"), INFO))
    a = method.sample(4, generator=torch.Generator().manual_seed(7))
    b = method.sample(4, generator=torch.Generator().manual_seed(7))
    c = method.sample(4, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    labelled = method.sample(2, labels=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(7))
    assert labelled.shape == (2, 3, 8, 8)


def test_classifier_free_guidance():
    method = perturbed(build_method(tiny(), INFO))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5, 300, 900]), torch.tensor([0, 2, 5])
    null = torch.full_like(y, method.dit.null_class)
    cond, uncond = method.ema(x, t, y)[:, :3], method.ema(x, t, null)[:, :3]   # eps channels (learn_sigma)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(method.guided_eps(x, t, y, 1.0), cond)
    torch.testing.assert_close(method.guided_eps(x, t, y, 0.0), uncond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.guided_eps(x, t, y, 2.0), 2 * cond - uncond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)


def test_validate_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.vae"):
        tiny(f"method.vae={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="method.sample_steps"):
        tiny("method.sample_steps=5000")
    with pytest.raises(ConfigError, match="model.patch_size"):
        tiny("model.patch_size=3")


# -- FID -----------------------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(a, a + 1.0) == pytest.approx(6.0, rel=1e-6)       # a mean shift of 1 per dim
    # Gaussians: FD(N(m1, S), N(m2, k^2 S)) = |m1 - m2|^2 + (1 - k)^2 tr S, for any (non-diagonal) S
    s = torch.cov(a.T)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.arange(6, dtype=torch.float64)
    assert frechet_distance(mu1, s, mu2, 9 * s) == pytest.approx(55.0 + 4 * float(s.trace()), rel=1e-9)
    # diagonal covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d1, d2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    assert frechet_distance(torch.zeros(3), d1.diag(), torch.ones(3), d2.diag()) == pytest.approx(3 + 4 + 1, rel=1e-9)
    # from samples of those Gaussians: close to the closed form
    x = torch.randn(20000, 3, generator=g) * d1.sqrt()
    y = torch.randn(20000, 3, generator=g) * d2.sqrt() + 1
    assert fid_from_features(x, y) == pytest.approx(8.0, rel=0.05)


def test_domain_feature_net_is_cached_and_labelled(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (256,), generator=g)
    net = domain_feature_net((x, y), "toy", epochs=1, cache=tmp_path)
    assert net.kind == "domain" and net.label.startswith("domain FID")
    assert len(list(tmp_path.glob("toy_1x8x8_n256_*.pt"))) == 1
    again = domain_feature_net((x, y), "toy", epochs=1, cache=tmp_path)
    torch.testing.assert_close(net.fn(x[:8]), again.fn(x[:8]))
    f = net.fn(x[:64])
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(f, net.fn((x[:64].float() * 0.3).to(torch.uint8))) > 1e-3   # darker images


# -- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from visrep.runner import pretrain

    out = tmp_path_factory.mktemp("diffusion")
    _, result = pretrain(tiny("train.max_steps=3", tmp_path=out))
    return result.checkpoint


def test_visrep_sample_writes_a_png(checkpoint, tmp_path):
    from PIL import Image

    from visrep.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", str(checkpoint), "--n", "4", "--out", str(out), "--labels", "0,circle", "--steps", "2",
                 "--seed", "1"]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 9 + 1, 2 * 9 + 1)        # 2 x 2 grid of 8 px images, 1 px padding
    again = tmp_path / "again.png"
    main(["sample", str(checkpoint), "--n", "4", "--out", str(again), "--labels", "0,circle", "--steps", "2",
          "--seed", "1"])
    assert out.read_bytes() == again.read_bytes()


def test_fid_protocol_reports_a_domain_fid(checkpoint, tmp_path, monkeypatch):
    from visrep.runner import evaluate_checkpoint

    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "cache"))
    results, table = evaluate_checkpoint([str(checkpoint)], protocols=["fid"], out_dir=str(tmp_path / "eval"),
                                         overrides=["eval.fid_samples=32", "method.sample_steps=2"])
    (key, value), = results["method_protocols"].items()
    (label, fid), = value.items()
    assert key.startswith("fid/") and label.startswith("domain FID") and "32 samples" in label
    assert "domain FID" in table

    # the same number recomputed here: the checkpoint's samples vs the seeded test images, through the cached
    # domain feature network, with a Frechet distance written independently (eigenvalues of S_a S_b)
    from visrep.eval.fid import domain_feature_net, extract, generate
    from visrep.runner import eval_context, load_trained

    cfg, method, _ = load_trained(str(checkpoint), ["eval.fid_samples=32", "method.sample_steps=2"])
    ctx = eval_context(cfg)
    (_, x_tr, y_tr), (_, x_te, y_te) = ctx.split("train"), ctx.split("test")
    g = torch.Generator().manual_seed(cfg.train.seed)
    pick = torch.randperm(len(x_te), generator=g)[:32]
    net = domain_feature_net((x_tr, y_tr), cfg.data.name, seed=cfg.train.seed)
    fake = generate(method, 32, labels=y_te[pick], generator=g)
    feats = {"fake": extract(net, fake).double(), "real": extract(net, x_te[pick]).double(),
             "other": extract(net, x_te[torch.randperm(len(x_te), generator=g)[:32]]).double(),
             "noise": extract(net, torch.randint(0, 256, fake.shape, generator=g, dtype=torch.uint8)).double()}

    def frechet(a, b):
        cross = torch.linalg.eigvals(torch.cov(a.T) @ torch.cov(b.T)).real.clamp(min=0).sqrt().sum()
        return float((a.mean(0) - b.mean(0)).square().sum() + torch.cov(a.T).trace() + torch.cov(b.T).trace()
                     - 2 * cross)

    assert fid == pytest.approx(frechet(feats["fake"], feats["real"]), rel=1e-4, abs=1e-6)
    assert abs(frechet(feats["real"], feats["real"])) < 1e-6 * fid          # a set against itself: 0
    assert frechet(feats["noise"], feats["real"]) > frechet(feats["other"], feats["real"])  # noise is far


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    dit = DiT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    with torch.no_grad():  # away from the zero init, so that every block contributes
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    grads = []
    for on in (False, True):
        dit.grad_checkpointing = on
        dit.zero_grad()
        dit(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in dit.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_latent_diffusion_with_a_local_vae(tmp_path):
    """method.vae: a (tiny, random) diffusers AutoencoderKL saved locally; the DiT works on its latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    method = build_method(tiny(f"method.vae={tmp_path / 'vae'}", "model.patch_size=1"), INFO)
    assert method.dit.in_chans == 4 and method.dit.img_size == 4          # 8 px images -> 4x4x4 latents
    assert not any(k.startswith("vae") for k in method.state_dict())     # the frozen VAE is not checkpointed
    batch = {"image": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), "label": torch.arange(4)}
    batch = method.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert batch["x0"].shape == (4, 4, 4, 4)
    method.training_step(batch, None)["loss"].backward()
    assert method.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 8, 8)
    assert method.features(batch["image"]).shape == (4, method.feature_dim)
