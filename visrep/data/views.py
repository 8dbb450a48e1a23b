"""Batched photometric transformations that report their parameters, and IWM view pairs.

IWM (Garrido et al., arXiv 2403.00504; no official code) conditions its predictor on the transformation
``a_{x->y}`` from a source view ``x`` to a target view ``y``. This module draws per-sample parameters
for a batch ``[B, C, H, W]`` from one explicit ``torch.Generator`` (float32 ``[B, 7]``, columns
:data:`PARAM_NAMES`; a transformation not applied reports its identity value), applies them with
:func:`apply_params` (identity parameters: the input bit for bit) and builds :func:`action`.

    y = brightness -> contrast -> saturation -> hue (fixed order) -> grayscale -> blur -> solarize (x)
    action = [norm(target) - norm(source) for the 4 jitter columns, source's grayscale, blur, solarize]

Each op matches ``torchvision.transforms.v2.functional`` up to float rounding. Choices where the paper
is silent: the fixed jitter order (torchvision's is random), torchvision's grey weights, blur kernel
10 % of the shorter side, source solarize p = 0.1 (appendix table; prose 0.2), the normalisation.
Specification and notes: docs/data/views.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "photometric_views",
    "PARAM_NAMES", "NUM_PARAMS", "IDENTITY_PARAMS", "LUMA_WEIGHTS", "PhotometricSpec", "TARGET",
    "SOURCE", "IDENTITY", "param_bounds", "blur_kernel_size", "sample_params", "apply_params",
    "photometric", "normalize_params", "action", "iwm_views",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "grayscale",
    "gaussian_blur", "solarize",
]

PARAM_NAMES = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
IDENTITY_PARAMS = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 has 0.299 for red).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

_B, _C, _S, _H, _GRAY, _SIGMA, _SOLAR = range(NUM_PARAMS)
_JITTER = slice(_B, _H + 1)
_DESTRUCTIVE = slice(_GRAY, _SOLAR + 1)
# Uniform draws per sample, one column each (fixed, whatever the spec or channel count).
_U_JITTER, _U_B, _U_C, _U_S, _U_H, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLAR = range(9)
_NUM_DRAWS = 9


@dataclass(frozen=True)
class PhotometricSpec:
    """Probabilities and strengths of the photometric augmentation (defaults: IWM's target view).

    ``jitter_p``: probability of colour jitter (all four factors drawn together, as
    ``RandomApply([ColorJitter(...)], p)``); ``brightness``/``contrast``/``saturation``: factor
    uniform in ``[max(0, 1-s), 1+s]``; ``hue``: shift uniform in ``[-s, s]``. ``grayscale_p``,
    ``blur_p``, ``solarize_p``: probabilities of the destructive ops; ``blur_sigma``: uniform sigma
    range in pixels; ``blur_kernel_frac`` / ``blur_kernel_size``: see :func:`blur_kernel_size`;
    ``solarize_threshold``: pixels ``>=`` it are inverted.
    """

    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    blur_kernel_size: int | None = None
    solarize_threshold: float = 0.5

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} strength must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ValueError(f"hue strength must be <= 0.5, got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")
        if not 0 < self.blur_kernel_frac <= 1:
            raise ValueError(f"blur_kernel_frac must be in (0, 1], got {self.blur_kernel_frac}")
        k = self.blur_kernel_size
        if k is not None and (k < 1 or k % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {k}")


# IWM target view: colour jitter only. Source view: independent jitter plus destructive ops;
# solarize p: the paper's appendix table says 0.1, its prose says 0.2.
TARGET = PhotometricSpec(jitter_p=0.8, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
SOURCE = PhotometricSpec(jitter_p=0.8, grayscale_p=0.2, blur_p=0.2, solarize_p=0.1)
# No photometric change at all (I-JEPA-like views).
IDENTITY = PhotometricSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def param_bounds(spec: PhotometricSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(low, high)`` per column of the raw parameters (identity values included)."""
    lo = [min(1.0, max(0.0, 1.0 - s)) for s in (spec.brightness, spec.contrast, spec.saturation)]
    hi = [1.0 + s for s in (spec.brightness, spec.contrast, spec.saturation)]
    return (tuple(lo) + (-spec.hue, 0.0, 0.0, 0.0),
            tuple(hi) + (spec.hue, 1.0, float(spec.blur_sigma[1]), 1.0))


def blur_kernel_size(spec: PhotometricSpec, height: int, width: int) -> int:
    """Odd Gaussian kernel size for an ``height x width`` image: ``spec.blur_kernel_size`` if set,
    else ``blur_kernel_frac`` of the shorter side rounded down to odd (at least 3); capped at
    ``2 * min(height, width) - 1`` so reflect padding stays valid."""
    short = min(int(height), int(width))
    if spec.blur_kernel_size is not None:
        k = int(spec.blur_kernel_size)
    else:
        k = max(3, int(spec.blur_kernel_frac * short) // 2 * 2 + 1)
    return max(1, min(k, 2 * short - 1))


# --------------------------------------------------------------------------------------------
# Batched ops with per-sample parameters (a factor / flag / sigma tensor of shape [B])
# --------------------------------------------------------------------------------------------
def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` grayscale (the image itself for one channel)."""
    if x.shape[1] == 1:
        return x
    wr, wg, wb = LUMA_WEIGHTS
    return torch.mul(x[:, 0:1], wr).add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio * x + (1 - ratio) * other`` clamped to [0, 1]; ``ratio == 1`` returns ``x`` exactly."""
    r = _per_sample(ratio, x)
    return (x * r + other * (1.0 - r)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply sample ``i`` by ``factor[i]`` and clamp to [0, 1]."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend sample ``i`` with the mean of its grayscale image (ratio ``factor[i]``)."""
    return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend sample ``i`` with its grayscale image (ratio ``factor[i]``); no-op for one channel."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _luma(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1)
    delta = v - x.amin(dim=1)
    chroma = delta > 0
    d = torch.where(chroma, delta, torch.ones_like(delta))
    # Sector by which channel holds the maximum (red first, then green), hue in units of 60 deg.
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h = torch.where(chroma, (h / 6.0).remainder(1.0), torch.zeros_like(h))
    s = delta / torch.where(v > 0, v, torch.ones_like(v))
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Closed form: channel n in (5, 3, 1) for (R, G, B), k = (n + 6h) mod 6,
    # value = v * (1 - s * clamp(min(k, 4 - k), 0, 1)).
    n = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype, device=h.device).view(1, 3, 1, 1)
    k = (n + h.unsqueeze(1) * 6.0).remainder(6.0)
    f = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(1) * (1.0 - s.unsqueeze(1) * f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of sample ``i`` by ``shift[i]`` (mod 1); exact no-op where the shift is 0
    and for one channel."""
    if x.shape[1] == 1:
        return x
    s_ = _per_sample(shift, x)
    h, s, v = _rgb_to_hsv(x)
    out = _hsv_to_rgb((h + s_[:, 0]).remainder(1.0), s, v)
    return torch.where(s_ != 0, out, x)


def grayscale(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Replace sample ``i`` by its luma, repeated over the channels, where ``flag[i]`` is set."""
    if x.shape[1] == 1:
        return x
    return torch.where(_per_sample(flag, x) > 0, _luma(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur of sample ``i`` with ``sigma[i]`` (0: unchanged) and one odd ``kernel_size``
    for the batch: torchvision's truncated, normalised kernel and reflect padding, applied as two
    depthwise 1-D convolutions with per-sample kernels."""
    B = x.shape[0]
    if B == 0 or kernel_size <= 1:
        return x
    sig = _per_sample(sigma, x).view(B)
    if x.device.type == "cpu":  # blur only these rows (on a CPU the convolutions are most of the cost;
        rows = (sig > 0).nonzero().view(-1)  # on a GPU, finding them would wait for the device)
        if rows.numel() < B:
            return x.index_copy(0, rows, _blur(x.index_select(0, rows), sig.index_select(0, rows), kernel_size))
    blur = (sig > 0).view(B, 1, 1, 1)
    return torch.where(blur, _blur(x, torch.where(blur.view(B), sig, torch.ones_like(sig)), kernel_size), x)


# From this kernel size on, a CPU blurs by summing shifted copies: oneDNN's depthwise convolution with few
# groups (the few blurred rows of a chunk) and a long kernel is 2-3x slower (measured at 1 thread: 224 px,
# 23 taps, 3-6 rows: 1.7-2.7 ms per image against 0.9; at 9 taps the convolution is the faster).
_SHIFTED_BLUR_MIN_KERNEL = 13


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:func:`gaussian_blur` of every sample (``sigma > 0``)."""
    B, C, H, W = x.shape
    sig = _per_sample(sigma, x).view(B, 1)
    r = kernel_size // 2
    pos = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device).view(1, -1)
    kernel = torch.softmax(-(pos * pos) / (2.0 * sig * sig), dim=1)  # [B, k], sums to 1
    if x.device.type == "cpu" and kernel_size >= _SHIFTED_BLUR_MIN_KERNEL:
        w = kernel.view(B, kernel_size, 1, 1, 1).unbind(1)
        y = F.pad(x, (r, r, 0, 0), mode="reflect")  # along the width, then the height
        out = torch.mul(y[..., 0:W], w[0])
        for t in range(1, kernel_size):
            out.addcmul_(y[..., t:t + W], w[t])
        y = F.pad(out, (0, 0, r, r), mode="reflect")
        torch.mul(y[..., 0:H, :], w[0], out=out)
        for t in range(1, kernel_size):
            out.addcmul_(y[..., t:t + H, :], w[t])
        return out
    kernel = kernel.repeat_interleave(C, dim=0)  # [B*C, k]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x: torch.Tensor, flag: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels ``>= threshold`` of sample ``i`` where ``flag[i]`` is set."""
    return torch.where((_per_sample(flag, x) > 0) & (x >= threshold), 1.0 - x, x)


# --------------------------------------------------------------------------------------------
# Sampling and applying parameters
# --------------------------------------------------------------------------------------------
def sample_params(batch: int, spec: PhotometricSpec, generator: torch.Generator | None = None,
                  channels: int = 3) -> torch.Tensor:
    """Draw ``float32 [batch, 7]`` parameters (columns :data:`PARAM_NAMES`) on the generator's
    device. Each call draws exactly ``batch x 9`` uniforms, whatever the spec or ``channels``."""
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(int(batch), _NUM_DRAWS, generator=generator, device=dev, dtype=torch.float32)
    ident = torch.tensor(IDENTITY_PARAMS, dtype=torch.float32, device=dev).expand(int(batch), -1)
    (blo, clo, slo, hlo, *_), (bhi, chi, shi, hhi, *_) = param_bounds(spec)
    lo = torch.tensor([blo, clo, slo, hlo], dtype=torch.float32, device=dev)
    hi = torch.tensor([bhi, chi, shi, hhi], dtype=torch.float32, device=dev)
    jitter = lo + (hi - lo) * u[:, _U_B:_U_H + 1]
    if channels == 1:  # saturation and hue do nothing to one channel: report the identity
        jitter[:, 2:4] = ident[:, _S:_H + 1]
    jitter = torch.where(u[:, _U_JITTER:_U_JITTER + 1] < spec.jitter_p, jitter, ident[:, _JITTER])
    gray = (u[:, _U_GRAY] < spec.grayscale_p) & (channels != 1)
    s_lo, s_hi = spec.blur_sigma
    sigma = torch.where(u[:, _U_BLUR] < spec.blur_p, s_lo + (s_hi - s_lo) * u[:, _U_SIGMA],
                        torch.zeros_like(u[:, _U_SIGMA]))
    solar = u[:, _U_SOLAR] < spec.solarize_p
    return torch.cat([jitter, gray.float()[:, None], sigma[:, None], solar.float()[:, None]], dim=1)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    if not images.is_floating_point():
        return images.to(torch.float32).div_(255.0)
    return images


_ALL_OPS = frozenset(PARAM_NAMES)


def _hue_rows_(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_hue` for rows that all have a shift (in place, fewer passes): ``mn + delta * c(H)``
    with ``c`` the piecewise-linear HSV -> RGB ramps (the same map up to float rounding)."""
    v, mn = y.amax(dim=1), y.amin(dim=1)
    delta = v - mn
    inv = delta.clamp(min=1e-30).reciprocal_()  # grey pixels: 0 * inv = 0
    r, g, b = y.unbind(dim=1)
    h6 = torch.where(v == r, (g - b).mul_(inv),
                     torch.where(v == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    h6.add_(shift.view(-1, 1, 1) * 6.0).remainder_(6.0)  # hue in sixths of a turn, [0, 6)
    for c, (centre, sign, offset) in enumerate(((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))):
        ramp = torch.sub(h6, centre).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
        torch.addcmul(mn, delta, ramp, out=y[:, c])
    return y


def _rows(flag: torch.Tensor) -> torch.Tensor | None:
    """Host indices of the set rows of a CPU flag vector (None: every row)."""
    idx = flag.nonzero().flatten()
    return None if idx.numel() == flag.numel() else idx


def _on_rows_(x: torch.Tensor, rows: torch.Tensor | None, fn) -> torch.Tensor:
    """``fn(y, rows)`` (which may work in place on ``y``) on rows ``rows`` of ``x`` (None: all), the other rows
    unchanged: the selected rows gathered when they are few, else the whole batch and the others put back."""
    if rows is None:
        return fn(x, slice(None))
    n = x.shape[0]
    if rows.numel() == 0:
        return x
    if 2 * rows.numel() <= n:
        idx = rows.to(x.device)
        return x.index_copy_(0, idx, fn(x.index_select(0, idx), rows))
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    other = keep.nonzero().flatten().to(x.device)
    saved = x.index_select(0, other)
    return fn(x, slice(None)).index_copy_(0, other, saved)


def _apply_host(x: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec, ops) -> torch.Tensor:
    """:func:`_apply` for parameters on the host: each op runs on the rows it changes only, in place on
    ``x`` (which the caller owns). Ops are per sample, so rows left out are those it leaves bit for bit."""
    p = params.to(dtype=x.dtype)
    dev = x.device

    def col(rows, c: int) -> torch.Tensor:
        return p[rows, c].to(dev)

    ident = torch.tensor(IDENTITY_PARAMS, dtype=p.dtype)
    jitter_ops = [n for n in ("brightness", "contrast", "saturation", "hue") if n in ops]
    if jitter_ops:
        cols = [PARAM_NAMES.index(n) for n in jitter_ops]
        jit = _rows((p[:, cols] != ident[cols]).any(dim=1))

        def jitter(y: torch.Tensor, rows) -> torch.Tensor:
            if "brightness" in ops:
                y.mul_(col(rows, _B).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
            if "contrast" in ops:  # ratio * y + (1 - ratio) * mean, as y * ratio + a per-sample constant
                ratio = col(rows, _C).view(-1, 1, 1, 1)  # (8x faster than lerp against an expanded mean)
                mean = _luma(y).mean(dim=(1, 2, 3), keepdim=True)
                y.mul_(ratio).add_(mean * (1.0 - ratio)).clamp_(0.0, 1.0)
            if "saturation" in ops and y.shape[1] == 3:
                # ratio * y + (1 - ratio) * luma; lerp keeps y exactly where ratio == 1
                torch.lerp(_luma(y).expand_as(y), y, col(rows, _S).view(-1, 1, 1, 1), out=y).clamp_(0.0, 1.0)
            if "hue" in ops and y.shape[1] == 3:
                shift = col(rows, _H)
                hue = p[rows, _H] != 0
                if bool(hue.all()):
                    y = _hue_rows_(y, shift)
                elif bool(hue.any()):
                    y = torch.where(shift.view(-1, 1, 1, 1) != 0, _hue_rows_(y.clone(), shift), y)
            return y

        x = _on_rows_(x, jit, jitter)
    if "grayscale" in ops and x.shape[1] == 3:
        x = _on_rows_(x, _rows(p[:, _GRAY] > 0), lambda y, rows: _luma(y).expand_as(y).contiguous())
    if "blur_sigma" in ops:
        k = blur_kernel_size(spec, x.shape[-2], x.shape[-1])
        # rows left out of the selection have sigma 0 here: a safe value, their blur is discarded
        x = _on_rows_(x, _rows(p[:, _SIGMA] > 0),
                      lambda y, rows: _blur(y, col(rows, _SIGMA).clamp(min=1e-3), k) if k > 1 else y)
    if "solarize" in ops:
        t = spec.solarize_threshold
        x = _on_rows_(x, _rows(p[:, _SOLAR] > 0), lambda y, rows: torch.where(y >= t, 1.0 - y, y))
    return x


def _apply(x: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec, ops=_ALL_OPS,
           owned: bool = False) -> torch.Tensor:
    """``ops`` of ``params`` on ``x``; ``owned``: ``x`` may be changed in place (the host path)."""
    out_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        x, owned = x.float(), True
    if params.device.type == "cpu" and x.shape[0] > 0:  # row selection needs no device sync
        return _apply_host(x if owned else x.clone(), params, spec, ops).to(out_dtype)
    p = params.to(device=x.device, dtype=x.dtype)
    if "brightness" in ops:
        x = adjust_brightness(x, p[:, _B])
    if "contrast" in ops:
        x = adjust_contrast(x, p[:, _C])
    if "saturation" in ops:
        x = adjust_saturation(x, p[:, _S])
    if "hue" in ops:
        x = adjust_hue(x, p[:, _H])
    if "grayscale" in ops:
        x = grayscale(x, p[:, _GRAY])
    if "blur_sigma" in ops:
        x = gaussian_blur(x, p[:, _SIGMA], blur_kernel_size(spec, x.shape[-2], x.shape[-1]))
    if "solarize" in ops:
        x = solarize(x, p[:, _SOLAR], spec.solarize_threshold)
    return x.to(out_dtype)


def apply_params(images: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec = SOURCE) -> torch.Tensor:
    """Apply given ``[B, 7]`` parameters to ``images`` (deterministic). ``spec`` supplies only the
    blur kernel size and the solarize threshold. Identity rows leave their images unchanged."""
    x = _to_float(images)
    if params.shape != (x.shape[0], NUM_PARAMS):
        raise ValueError(f"params must be [{x.shape[0]}, {NUM_PARAMS}], got {tuple(params.shape)}")
    return _apply(x, params, spec, owned=x is not images)


def photometric(images: torch.Tensor, spec: PhotometricSpec,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random photometric augmentation of a batch: ``(out, params)`` with ``out`` like ``images``
    (uint8 -> float32 in [0, 1]) and ``params`` ``float32 [B, 7]`` on ``images.device``
    (columns :data:`PARAM_NAMES`). ``generator=None`` uses torch's global CPU generator."""
    return _photometric(images, spec, generator, owned=False)


def _ops_for(spec: PhotometricSpec, channels: int) -> set[str]:
    """The ops that ``spec`` ever draws for ``channels`` (a static choice: no host-device synchronisation)."""
    ops = set()
    if spec.jitter_p > 0:
        ops |= {n for n in ("brightness", "contrast", "saturation", "hue") if getattr(spec, n) > 0}
    if channels == 1:
        ops -= {"saturation", "hue"}
    for name, p in (("grayscale", spec.grayscale_p), ("blur_sigma", spec.blur_p), ("solarize", spec.solarize_p)):
        if p > 0 and not (name == "grayscale" and channels == 1):
            ops.add(name)
    return ops


def _photometric(images: torch.Tensor, spec: PhotometricSpec, generator: torch.Generator | None,
                 owned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = _to_float(images)
    owned = owned or x is not images
    params = sample_params(x.shape[0], spec, generator, channels=x.shape[1])
    return _apply(x, params, spec, _ops_for(spec, x.shape[1]), owned=owned), params.to(x.device)


# Rows per chunk on a CPU: about this many float32 values (4 MiB), so that the dozens of passes of one
# chunk's ops run in the core's cache instead of streaming the whole batch through memory each time
# (measured at 1 thread, 224 px: 36 ns per value for a batch of 64 views, 12 in chunks), and so that the
# blur's convolution sees few distinct shapes (oneDNN builds a kernel per shape).
_CHUNK_VALUES = 1 << 20


def _photometric_views_cpu(crops: Tensor, params: Tensor, spec: PhotometricSpec, normalize: nn.Module) -> Tensor:
    """:func:`photometric_views` on a CPU, chunk by chunk: each chunk of view-major rows is converted to
    float, transformed (:func:`_apply_host`, per sample, so the chunking changes no value), normalised
    and written to its place in the ``[B, n, C, s, s]`` output (one pass over memory instead of dozens)."""
    from visrep.models.vit import Normalize

    B, n = crops.shape[:2]
    out = torch.empty(crops.shape, dtype=torch.float32 if not crops.is_floating_point() else crops.dtype)
    ops = _ops_for(spec, crops.shape[2])
    rows = max(1, _CHUNK_VALUES // max(1, crops[0, 0].numel()))
    fast_norm = type(normalize) is Normalize and out.dtype == torch.float32 and normalize.mean.device.type == "cpu"
    for r0 in range(0, n * B, rows):  # chunks of the view-major rows (row j * B + i: view j of sample i)
        r1 = min(n * B, r0 + rows)
        pieces = [(j, max(r0 - j * B, 0), min(r1 - j * B, B)) for j in range(r0 // B, (r1 - 1) // B + 1)]
        x = torch.cat([crops[lo:hi, j] for j, lo, hi in pieces])
        x = x.to(torch.float32).div_(255.0) if not x.is_floating_point() else x  # cat made it our own
        y = _apply(x, params[r0:r1], spec, ops, owned=True)
        if fast_norm:  # Normalize's (x - mean) / std, in place on our own chunk
            y = y.sub_(normalize.mean).div_(normalize.std)
        else:
            y = normalize(y)
        k = 0
        for j, lo, hi in pieces:
            out[lo:hi, j] = y[k:k + hi - lo]
            k += hi - lo
    return out


# --------------------------------------------------------------------------------------------
# Normalised parameters and the IWM action
# --------------------------------------------------------------------------------------------
def normalize_params(params: torch.Tensor, spec: PhotometricSpec) -> torch.Tensor:
    """Map raw ``[B, 7]`` parameters to a fixed scale: jitter factors ``(f - 1) / s`` and hue
    ``h / s`` in [-1, 1] (0 when the strength ``s`` is 0), ``sigma / sigma_max`` in [0, 1], flags
    unchanged in {0, 1}. The identity parameters map to zeros."""
    strengths = [spec.brightness, spec.contrast, spec.saturation, spec.hue]
    scale = torch.tensor([1.0 / s if s > 0 else 0.0 for s in strengths]
                         + [1.0, 1.0 / float(spec.blur_sigma[1]), 1.0],
                         dtype=params.dtype, device=params.device)
    shift = torch.tensor(IDENTITY_PARAMS, dtype=params.dtype, device=params.device)
    return (params - shift) * scale


def action(params_source: torch.Tensor, params_target: torch.Tensor, spec: PhotometricSpec = SOURCE) -> torch.Tensor:
    """IWM action ``a_{x->y}``, ``[B, 7]`` in :data:`PARAM_NAMES` order: normalised target minus
    normalised source for the 4 jitter columns (each in [-2, 2]), the source's normalised
    grayscale flag, blur sigma and solarize flag for the rest. Both sides are normalised with the
    same ``spec`` (so equal raw changes give equal action values); the target's destructive columns
    are ignored. No change on either side gives zeros."""
    ns, nt = normalize_params(params_source, spec), normalize_params(params_target, spec)
    return torch.cat([nt[:, _JITTER] - ns[:, _JITTER], ns[:, _DESTRUCTIVE]], dim=1)


def iwm_views(images: torch.Tensor, generator: torch.Generator | None = None, source: PhotometricSpec = SOURCE,
              target: PhotometricSpec = TARGET) -> dict[str, torch.Tensor]:
    """IWM source/target views of the same (already cropped) images with independent photometric
    draws (source drawn first, then target, from ``generator``). Returns ``source`` (x), ``target``
    (y), ``action`` (a_{x->y}, normalised with the ``source`` spec), ``params_source`` and
    ``params_target`` (raw, ``[B, 7]``)."""
    x, ps = photometric(images, source, generator)
    y, pt = photometric(images, target, generator)
    return dict(source=x, target=y, action=action(ps, pt, source), params_source=ps, params_target=pt)


def photometric_views(crops: Tensor, spec: PhotometricSpec, normalize: nn.Module,
                      generator: torch.Generator) -> Tensor:
    """Photometric ops (``spec``) and normalisation of views ``[B, n, C, s, s]`` (``uint8``, or float in
    [0, 1], from :func:`visrep.data.crops.take_crops`) in one batched call, view-major draws; same shape
    out, float (per-sample leading dim, so sharding a batch shards its views). On a CPU the work goes
    chunk by chunk through the cache (the same values)."""
    if crops.dim() != 5 or crops.shape[2] not in (1, 3):
        raise ValueError(f"views must be [B, n, C, s, s] with C = 1 or 3, got {tuple(crops.shape)}")
    B, n, C = crops.shape[:3]
    params = sample_params(n * B, spec, generator, channels=C)
    if crops.device.type == "cpu" and params.device.type == "cpu" and crops.numel() > 0:
        return _photometric_views_cpu(crops, params, spec, normalize)
    return _photometric_views_flat(crops, params, spec, normalize)


def _photometric_views_flat(crops: Tensor, params: Tensor, spec: PhotometricSpec, normalize: nn.Module) -> Tensor:
    """:func:`photometric_views` in one batch of every view (an accelerator's path)."""
    B, n, C = crops.shape[:3]
    flat = crops.transpose(0, 1).reshape(n * B, *crops.shape[2:])
    x = _to_float(flat)
    # a copy of the views (a conversion, or n > 1) may be changed in place; a view of the caller's may not
    owned = x.untyped_storage().data_ptr() != crops.untyped_storage().data_ptr()
    x = _apply(x, params, spec, _ops_for(spec, C), owned=owned)
    x = normalize(x)
    return x.reshape(n, B, *x.shape[1:]).transpose(0, 1)
