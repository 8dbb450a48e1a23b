"""Frechet distance between image sets in the feature space of a fixed network (FID).

    FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

(Heusel et al., 2017). ``tr (S_a S_b)^1/2`` is computed as the trace of the symmetric PSD matrix
``(S_a^1/2 S_b S_a^1/2)^1/2`` (same eigenvalues), with two ``torch.linalg.eigh`` in float64: no
scipy, and no complex parts to discard.

Two feature networks, never mixed in one number:

* ``inception``: the standard FID network (Inception-v3 pool3, 2048-d, TF-ported weights) through
  torch-fidelity, used only when the package is installed and its weights file is already on
  disk (``eval.fid_weights`` or torch's hub cache); never downloaded. Comparable to published FID
  only at published sample counts and resolutions.
* ``domain`` (offline, always available): a small CNN classifier trained by visrep on the training
  split of the same dataset (cached on disk, keyed by dataset, size, sample count, epochs and
  seed); its penultimate features give a **domain FID**, always labelled as such. It is a
  within-dataset yardstick (before vs after training, model A vs model B) and is not comparable
  to published FID.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's file name


# -- the distance --------------------------------------------------------------------------------
def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of ``features`` [N, D], in float64."""
    f = features.detach().to(torch.float64).cpu()
    if f.dim() != 2 or f.size(0) < 2:
        raise ValueError(f"feature_stats needs [N >= 2, D] features, got {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.size(0) - 1)


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor) -> float:
    """The Frechet distance between the Gaussians N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b, sigma_a, sigma_b = (x.to(torch.float64) for x in (mu_a, mu_b, sigma_a, sigma_b))
    root_a = _sqrtm_psd(sigma_a)
    cross = torch.linalg.eigvalsh(root_a @ sigma_b @ root_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * cross
    return float(value.clamp(min=0))


def fid_from_features(a: Tensor, b: Tensor) -> float:
    """Frechet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# -- feature networks ----------------------------------------------------------------------------
@dataclass
class FeatureNet:
    """A feature network for FID: ``fn(uint8 images [B, C, H, W]) -> [B, D]`` and what it is."""

    fn: Callable[[Tensor], Tensor]
    kind: str           # "domain" or "inception"
    description: str

    @property
    def label(self) -> str:
        what = "domain FID" if self.kind == "domain" else "FID"
        return f"{what} ({self.description})"


class DomainClassifier(nn.Module):
    """A small CNN (three 3x3 conv stages, global average pool): penultimate features, then logits."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 32):
        super().__init__()
        self.arch = dict(in_chans=in_chans, num_classes=num_classes, width=width)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.BatchNorm2d(w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - 0.5) / 0.5

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def cache_dir() -> Path:
    """Where trained FID classifiers are kept: ``$VISREP_CACHE/fid`` (default ``~/.cache/visrep/fid``)."""
    root = os.environ.get("VISREP_CACHE") or Path.home() / ".cache" / "visrep"
    return Path(root) / "fid"


def domain_classifier(train: tuple[Tensor, Tensor], dataset: str, *, epochs: int = 3, seed: int = 0,
                      batch_size: int = 128, lr: float = 2e-3, cache: str | Path | None = None,
                      device: str | torch.device = "cpu") -> tuple[DomainClassifier, dict]:
    """The domain FID network for ``dataset``: trained on ``train = (uint8 images, labels)`` with
    AdamW (``visrep.eval.finetune.train_classifier``) or loaded from the cache. Returns the
    classifier (eval mode) and its record (key, training top-1 on a held-out tenth)."""
    from visrep.eval.finetune import train_classifier

    x, y = train
    if x.dtype != torch.uint8:
        raise ValueError("domain_classifier trains on uint8 images")
    n, c, h, w = x.shape
    classes = int(y.max()) + 1
    # the content of the data, not only its name: a different subset gets its own classifier
    digest = hashlib.sha1(x[:: max(1, n // 64)].numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:10]
    key = f"{dataset}_{c}x{h}x{w}_n{n}_k{classes}_e{epochs}_s{seed}_{digest}_v1"
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"{key}.pt"
    model = DomainClassifier(c, classes)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        return model.to(device).eval(), saved["record"]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    held = order[: max(1, n // 10)]
    fit = order[max(1, n // 10):]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(c, classes)
    out = train_classifier(model, [{"params": list(model.parameters()), "lr": lr}], (x[fit], y[fit]),
                           (x[held], y[held]), epochs=epochs, batch_size=batch_size, generator=g, device=device,
                           desc=f"domain FID classifier ({dataset})")
    record = {"key": key, "held_out_top1": out["top1"], "seconds": out["seconds"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "record": record}, tmp)
    os.replace(tmp, path)
    return model.eval(), record


def domain_feature_net(train: tuple[Tensor, Tensor], dataset: str, **kwargs) -> FeatureNet:
    """The offline feature network: penultimate features of :func:`domain_classifier`."""
    model, record = domain_classifier(train, dataset, **kwargs)
    c, h, w = train[0].shape[1:]
    desc = (f"visrep CNN classifier of {dataset} at {h}x{w}, {model.feature_dim}-d penultimate features, "
            f"held-out top-1 {record['held_out_top1']:.1f}%")
    return FeatureNet(torch.no_grad()(model.features), "domain", desc)


def inception_feature_net(weights: str | Path | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """The standard FID network (torch-fidelity's Inception-v3, pool3 2048-d) from local weights only."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise RuntimeError("eval.fid_feature=inception needs torch-fidelity (pip install torch-fidelity) and its "
                           f"Inception weights on disk ({INCEPTION_WEIGHTS}); use eval.fid_feature=domain offline"
                           ) from None
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"Inception FID weights not found at {path} (they are never downloaded here): put "
                                f"{INCEPTION_WEIGHTS} there or set eval.fid_weights; use eval.fid_feature=domain "
                                "offline")
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    net = net.to(device).eval()

    @torch.no_grad()
    def fn(images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return net(images.to(torch.uint8).contiguous())[0].flatten(1)

    return FeatureNet(fn, "inception", "Inception-v3 pool3 via torch-fidelity")


# -- FID of a generator --------------------------------------------------------------------------
@torch.no_grad()
def extract(net: FeatureNet, images: Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    return torch.cat([net.fn(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])


@torch.no_grad()
def generate(method, n: int, labels: Tensor | None = None, batch_size: int = 256,
             generator: torch.Generator | None = None) -> Tensor:
    """``n`` uint8 samples of a generator (``Method.sample``), in batches from one generator."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        out.append(method.sample(k, labels=None if labels is None else labels[start:start + k], generator=g))
    return torch.cat(out)


def fid_protocol(method, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], dataset: str, *,
                 n: int = 1000, feature: str = "domain", weights: str | None = None, batch_size: int = 256,
                 seed: int = 0, device: str | torch.device = "cpu", net: FeatureNet | None = None) -> dict[str, float]:
    """FID of ``n`` samples of ``method`` vs ``n`` test images (drawn with ``seed``); class-conditional
    generators get the drawn test images' labels. Returns ``{label: value}``, the label saying which
    feature network (a domain FID is never reported as FID)."""
    g = torch.Generator().manual_seed(seed)
    x_te, y_te = test
    n = min(n, len(x_te))
    pick = torch.randperm(len(x_te), generator=g)[:n]
    real, labels = x_te[pick], y_te[pick]
    if net is None:
        net = (inception_feature_net(weights, device) if feature == "inception"
               else domain_feature_net(train, dataset, seed=seed, device=device))
    fake = generate(method, n, labels=labels if (labels >= 0).all() else None, batch_size=batch_size, generator=g)
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples {tuple(fake.shape[1:])} and test images {tuple(real.shape[1:])} differ in shape")
    value = fid_from_features(extract(net, fake, batch_size, device), extract(net, real, batch_size, device))
    return {f"{net.label}, {n} samples": value}


__all__ = ["DomainClassifier", "FeatureNet", "domain_classifier", "domain_feature_net", "extract", "feature_stats",
           "fid_from_features", "fid_protocol", "frechet_distance", "generate", "inception_feature_net"]
