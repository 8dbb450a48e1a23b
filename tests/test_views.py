"""Tests for visrep.data.views: batched photometric ops with reported parameters (IWM views)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from visrep.data.views import (
    IDENTITY,
    IDENTITY_PARAMS,
    NUM_PARAMS,
    PARAM_NAMES,
    SOURCE,
    TARGET,
    PhotometricSpec,
    action,
    apply_params,
    blur_kernel_size,
    iwm_views,
    normalize_params,
    param_bounds,
    photometric,
    sample_params,
)

ATOL = 1e-5
# Every op drawn for every sample: exercises the whole pipeline.
ALL_ON = PhotometricSpec(jitter_p=1.0, grayscale_p=0.5, blur_p=0.7, solarize_p=0.5)


def _images(b=6, c=3, h=20, w=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


def _identity(b):
    return torch.tensor(IDENTITY_PARAMS).repeat(b, 1)


def _tv_reference(x, p, spec):
    """torchvision v2 functional ops on one [C,H,W] image, in this module's order."""
    b, c, s, h, gray, sigma, solar = p.tolist()
    x = TF.adjust_brightness(x, b)
    x = TF.adjust_contrast(x, c)
    x = TF.adjust_saturation(x, s)
    if h != 0:
        x = TF.adjust_hue(x, h)
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if sigma > 0:
        k = blur_kernel_size(spec, x.shape[-2], x.shape[-1])
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if solar:
        x = TF.solarize(x, spec.solarize_threshold)
    return x


@pytest.mark.parametrize("col,values", [
    ("brightness", [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
    ("contrast", [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
    ("saturation", [0.0, 0.8, 1.0, 1.2, 3.0, 0.5]),
    ("hue", [-0.5, -0.1, 0.03, 0.1, 0.5, 0.27]),
    ("grayscale", [1, 0, 1, 1, 0, 1]),
    ("blur_sigma", [0.1, 0.5, 0.0, 1.3, 2.0, 3.0]),
    ("solarize", [1, 0, 1, 1, 0, 1]),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_op_matches_torchvision(col, values, channels):
    x = _images(c=channels, h=24, w=21)
    x[:, :, :2, :3] = torch.tensor([0.0, 0.25, 1.0])  # exact solarize threshold, saturated pixels
    spec = PhotometricSpec(blur_kernel_size=7, solarize_threshold=0.25)
    p = _identity(len(values))
    p[:, PARAM_NAMES.index(col)] = torch.tensor(values, dtype=torch.float32)
    out = apply_params(x, p, spec)
    ref = torch.stack([_tv_reference(x[i], p[i], spec) for i in range(len(values))])
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_full_pipeline_matches_torchvision(channels):
    x = _images(b=8, c=channels, h=32, w=30, seed=1)
    g = torch.Generator().manual_seed(3)
    out, p = photometric(x, ALL_ON, g)
    assert blur_kernel_size(ALL_ON, 32, 30) == 3
    ref = torch.stack([_tv_reference(x[i], p[i], ALL_ON) for i in range(x.shape[0])])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kernel", [7, 15])  # 15: a CPU sums shifted copies instead of convolving
def test_long_blur_matches_torchvision(kernel):
    x = _images(b=4, h=40, w=33)
    spec = PhotometricSpec(blur_kernel_size=kernel)
    p = _identity(4)
    p[:, PARAM_NAMES.index("blur_sigma")] = torch.tensor([0.1, 0.7, 2.0, 3.5])
    ref = torch.stack([_tv_reference(x[i], p[i], spec) for i in range(4)])
    torch.testing.assert_close(apply_params(x, p, spec), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_views_in_cpu_chunks_equal_one_batch(channels, monkeypatch):
    """The CPU path (chunks of view-major rows through the cache, uint8 converted per chunk) gives the
    values of the one-batch path, whatever the chunk size (here chunks that split views)."""
    from visrep.data import views as V
    from visrep.models.vit import Normalize

    g = torch.Generator().manual_seed(5)
    crops = torch.randint(0, 256, (5, 3, channels, 20, 18), dtype=torch.uint8, generator=g)
    norm = Normalize((0.4,) * channels, (0.2,) * channels)
    params = sample_params(15, ALL_ON, torch.Generator().manual_seed(6), channels=channels)
    flat = V._photometric_views_flat(crops, params, ALL_ON, norm)
    for rows in (1, 2, 4, 15):
        monkeypatch.setattr(V, "_CHUNK_VALUES", rows * channels * 20 * 18)
        out = V._photometric_views_cpu(crops, params, ALL_ON, norm)
        assert out.shape == crops.shape and out.dtype == torch.float32 and out.is_contiguous()
        torch.testing.assert_close(out, flat, atol=1e-6, rtol=0)
        floats = crops.float() / 255
        before = floats.clone()
        torch.testing.assert_close(V._photometric_views_cpu(floats, params, ALL_ON, norm), flat, atol=1e-6, rtol=0)
        assert torch.equal(floats, before)  # the caller's views are left as they were
    # the public function: the same draws (view-major) as sample_params
    out = V.photometric_views(crops, ALL_ON, norm, torch.Generator().manual_seed(6))
    torch.testing.assert_close(out, flat, atol=1e-6, rtol=0)


def test_blur_kernel_size():
    assert blur_kernel_size(SOURCE, 224, 224) == 23
    assert blur_kernel_size(SOURCE, 32, 32) == 3
    assert blur_kernel_size(PhotometricSpec(blur_kernel_size=9), 32, 40) == 9
    assert blur_kernel_size(PhotometricSpec(blur_kernel_size=99), 4, 40) == 7  # reflect-pad cap


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_params_give_identity_image(channels):
    x = _images(c=channels)
    assert torch.equal(apply_params(x, _identity(x.shape[0])), x)
    out, p = photometric(x, IDENTITY, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert torch.equal(p, _identity(x.shape[0]))
    # Rows drawn as "not applied" keep their image exactly, others change.
    out, p = photometric(_images(b=64, c=channels), SOURCE, torch.Generator().manual_seed(1))
    same = (out == _images(b=64, c=channels)).flatten(1).all(1)
    ident = (p == _identity(64)).all(1)
    assert ident.any() and (~ident).any()
    assert torch.equal(same, ident)


def test_determinism_and_seed_dependence():
    x = _images()
    a = photometric(x, SOURCE, torch.Generator().manual_seed(7))
    b = photometric(x, SOURCE, torch.Generator().manual_seed(7))
    c = photometric(x, SOURCE, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])
    # The number of draws does not depend on the spec or the channel count.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sample_params(4, SOURCE, g1, channels=3)
    sample_params(4, IDENTITY, g2, channels=1)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_uint8(channels):
    x8 = (_images(b=5, c=channels) * 255).to(torch.uint8)
    v = iwm_views(x8, torch.Generator().manual_seed(0))
    for key in ("source", "target"):
        assert v[key].shape == x8.shape and v[key].dtype == torch.float32
    for key in ("action", "params_source", "params_target"):
        assert v[key].shape == (5, NUM_PARAMS) and v[key].dtype == torch.float32
    out, p = photometric(x8, SOURCE, torch.Generator().manual_seed(2))
    ref, p2 = photometric(x8.float() / 255, SOURCE, torch.Generator().manual_seed(2))
    assert torch.equal(p, p2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    empty, pe = photometric(x8[:0], SOURCE, torch.Generator())
    assert empty.shape == (0, channels, 20, 18) and pe.shape == (0, NUM_PARAMS)
    with pytest.raises(ValueError):
        photometric(torch.rand(2, 2, 8, 8), SOURCE, torch.Generator())


@pytest.mark.parametrize("channels", [1, 3])
def test_params_ranges_and_frequencies(channels):
    n = 20000
    p = sample_params(n, SOURCE, torch.Generator().manual_seed(0), channels=channels)
    lo, hi = (torch.tensor(t) for t in param_bounds(SOURCE))
    assert (p >= lo).all() and (p <= hi).all()
    ident = torch.tensor(IDENTITY_PARAMS)
    jittered = (p[:, 0] != 1).float().mean()
    assert abs(jittered - 0.8) < 0.02
    if channels == 3:
        assert abs((p[:, 4] == 1).float().mean() - 0.2) < 0.02
    else:  # saturation, hue and grayscale are no-ops on one channel: reported as identity
        assert (p[:, 2:5] == ident[2:5]).all()
    assert abs((p[:, 5] > 0).float().mean() - 0.2) < 0.02
    assert abs((p[:, 6] == 1).float().mean() - 0.1) < 0.02
    assert set(p[:, 4].unique().tolist()) <= {0.0, 1.0} and set(p[:, 6].unique().tolist()) <= {0.0, 1.0}
    sig = p[:, 5][p[:, 5] > 0]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    z = normalize_params(p, SOURCE)
    assert (z[:, :4].abs() <= 1 + 1e-6).all() and (z[:, 4:] >= 0).all() and (z[:, 4:] <= 1).all()
    assert torch.equal(normalize_params(ident[None], SOURCE), torch.zeros(1, NUM_PARAMS))
    # the target never draws a destructive op
    pt = sample_params(n, TARGET, torch.Generator().manual_seed(1), channels=channels)
    assert (pt[:, 4:] == 0).all()


def test_action():
    x = _images()
    v = iwm_views(x, torch.Generator().manual_seed(0), source=IDENTITY, target=IDENTITY)
    assert torch.equal(v["action"], torch.zeros(x.shape[0], NUM_PARAMS))
    assert torch.equal(v["source"], x) and torch.equal(v["target"], x)
    # identical jitter on both sides and no destructive op: zero action
    p = sample_params(16, TARGET, torch.Generator().manual_seed(1))
    assert torch.equal(action(p, p, SOURCE), torch.zeros(16, NUM_PARAMS))
    # composition: jitter differences (target - source), source's destructive columns
    v = iwm_views(x, torch.Generator().manual_seed(4))
    ns, nt = normalize_params(v["params_source"], SOURCE), normalize_params(v["params_target"], SOURCE)
    torch.testing.assert_close(v["action"][:, :4], nt[:, :4] - ns[:, :4])
    torch.testing.assert_close(v["action"][:, 4:], ns[:, 4:])
    assert (v["action"][:, :4].abs() <= 2 + 1e-6).all()
    # independent draws: source and target parameters differ
    assert not torch.equal(v["params_source"][:, :4], v["params_target"][:, :4])
    # the views are the photometric draws in order source, target from the same generator
    g = torch.Generator().manual_seed(4)
    xs, _ = photometric(x, SOURCE, g)
    xt, _ = photometric(x, TARGET, g)
    assert torch.equal(v["source"], xs) and torch.equal(v["target"], xt)


def test_device_agnostic():
    """Images on a non-CPU device with a CPU generator: 'meta' tensors reject any mixing with CPU
    tensors, so this checks that every tensor follows the images' device (no CUDA needed)."""
    x = torch.empty(4, 3, 16, 16, device="meta")
    v = iwm_views(x, torch.Generator().manual_seed(0), source=ALL_ON)
    assert all(t.device.type == "meta" for t in v.values())
    assert v["source"].shape == x.shape and v["action"].shape == (4, NUM_PARAMS)
    if torch.cuda.is_available():
        xc = _images()
        out, p = photometric(xc.cuda(), ALL_ON, torch.Generator().manual_seed(0))
        ref, pr = photometric(xc, ALL_ON, torch.Generator().manual_seed(0))
        assert out.is_cuda and p.is_cuda
        torch.testing.assert_close(p.cpu(), pr)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=0)


def test_spec_validation():
    with pytest.raises(ValueError):
        PhotometricSpec(jitter_p=1.5)
    with pytest.raises(ValueError):
        PhotometricSpec(hue=0.6)
    with pytest.raises(ValueError):
        PhotometricSpec(blur_sigma=(0.0, 1.0))
    with pytest.raises(ValueError):
        PhotometricSpec(blur_kernel_size=4)
    assert SOURCE.solarize_p == 0.1 and TARGET.grayscale_p == 0 and TARGET.jitter_p == 0.8


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 2, 4, 8, 8)])
def test_photometric_views_names_the_expected_shape(shape):
    from visrep.data.views import photometric_views
    from visrep.models.vit import Normalize

    with pytest.raises(ValueError, match=r"\[B, n, C, s, s\] with C = 1 or 3"):
        photometric_views(torch.zeros(shape), ALL_ON, Normalize((0.5,) * 3, (0.5,) * 3), torch.Generator())
