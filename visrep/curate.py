"""Data curation in the manner of DINOv2 (paper section 3, "automatic data pipeline").

    visrep curate runs/dinov2-fmnist/last.pt --out curated.txt --dedup 0.95 --size 20000
    visrep pretrain dinov2/fashion_mnist data.subset_file=curated.txt

Stages: **embed** (L2-normalised) -> **deduplicate** (cosine >= ``dedup_threshold``, each connected
group keeps its lowest index) -> **retrieve** (optional: ``retrieval_k`` nearest neighbours of
``seeds``) -> **balance** ((hierarchical) k-means, equal share per cluster, water-filling), written as
a file list that ``data.subset_file`` reads. faiss is optional (``pip install visrep[curate]``).
Specification and notes: docs/curate.md
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from visrep.data.subsets import read_file_list, write_file_list

__all__ = ["CurationResult", "curate_embeddings", "curate", "curate_checkpoint", "deduplicate", "balanced_sample",
           "write_file_list", "read_file_list"]


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("visrep curate needs faiss: pip install 'visrep[curate]' (faiss-cpu)") from e
    return faiss


@dataclass
class CurationResult:
    indices: np.ndarray                      # selected dataset indices (ascending)
    counts: dict[str, int] = field(default_factory=dict)   # images after each stage
    clusters: np.ndarray | None = None       # cluster id of each selected image

    def report(self) -> str:
        lines, prev = [], None
        for stage, n in self.counts.items():
            change = "" if prev is None else f"  ({n - prev:+d})"
            lines.append(f"{stage:<12} {n:>9d}{change}")
            prev = n
        return "\n".join(lines)


def deduplicate(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept after linking every pair with cosine >= ``threshold`` (rows L2-normalised) and
    keeping the lowest index of each connected group."""
    faiss = _faiss()
    n = emb.shape[0]
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    lims, _, ids = index.range_search(emb, float(threshold))
    rows = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(rows[rows != ids], ids[rows != ids]):   # only linked pairs: few compared with n
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    return np.flatnonzero(roots == np.arange(n))


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    k = max(1, min(k, x.shape[0]))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assign[:, 0], km.centroids


def _water_fill(sizes: np.ndarray, total: int) -> np.ndarray:
    """Per-group quotas summing to ``min(total, sizes.sum())``, as equal as the sizes allow."""
    quota = np.zeros_like(sizes)
    left, open_ = min(total, int(sizes.sum())), sizes > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        for g in np.flatnonzero(open_):
            take = min(share, int(sizes[g] - quota[g]), left)
            quota[g] += take
            left -= take
            if quota[g] == sizes[g]:
                open_[g] = False
            if left == 0:
                break
    return quota


def balanced_sample(emb: np.ndarray, size: int, n_clusters: int, levels: int = 1, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``size`` row indices of ``emb`` balanced over k-means clusters (``levels=2``: over
    super-clusters of the clusters, then over the clusters inside each); returns (rows, cluster ids)."""
    rng = np.random.default_rng(seed)
    assign, centroids = _kmeans(emb, n_clusters, seed)
    groups = assign
    if levels >= 2:
        top, _ = _kmeans(centroids, max(2, int(round(math.sqrt(centroids.shape[0])))), seed + 1)
        groups = top[assign]
    chosen = []
    sizes = np.bincount(groups, minlength=groups.max() + 1)
    for g, q in enumerate(_water_fill(sizes, size)):
        members = np.flatnonzero(groups == g)
        if levels >= 2 and q:   # inside a super-cluster: balanced over its clusters
            sub = assign[members]
            ids, inv = np.unique(sub, return_inverse=True)
            sub_q = _water_fill(np.bincount(inv, minlength=len(ids)), int(q))
            for j, qq in enumerate(sub_q):
                chosen.append(rng.choice(members[inv == j], int(qq), replace=False))
        elif q:
            chosen.append(rng.choice(members, int(q), replace=False))
    rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return rows, assign[rows]


def curate_embeddings(emb: np.ndarray | Tensor, *, dedup_threshold: float | None = 0.95,
                      seeds: np.ndarray | Tensor | None = None, retrieval_k: int = 100,
                      size: int | None = None, n_clusters: int = 100, levels: int = 1, seed: int = 0
                      ) -> CurationResult:
    """The curation stages on precomputed embeddings ``[N, D]`` (normalised here)."""
    emb = torch.nn.functional.normalize(torch.as_tensor(emb).float(), dim=1).numpy()
    counts = {"input": emb.shape[0]}
    keep = np.arange(emb.shape[0])
    if dedup_threshold is not None:
        keep = deduplicate(emb, dedup_threshold)
        counts["deduplicated"] = len(keep)
    if seeds is not None:
        faiss = _faiss()
        s = torch.nn.functional.normalize(torch.as_tensor(seeds).float(), dim=1).numpy()
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb[keep])
        _, nn = index.search(s, min(retrieval_k, len(keep)))
        keep = keep[np.unique(nn[nn >= 0])]
        counts["retrieved"] = len(keep)
    clusters = None
    if size is not None:
        rows, clusters = balanced_sample(emb[keep], size, n_clusters, levels, seed)
        keep = keep[rows]
        counts["balanced"] = len(keep)
    return CurationResult(indices=np.sort(keep), counts=counts, clusters=clusters)


def curate(encoder_fn: Callable[[Tensor], Tensor], images, *, batch_size: int = 512,
           progress: bool = True, seed_images: Tensor | None = None, **kwargs) -> CurationResult:
    """Embed ``images`` (a uint8 tensor, or a dataset of ``(image, label)``) and ``seed_images`` with
    ``encoder_fn`` (e.g. ``method.features``), then :func:`curate_embeddings`."""
    from visrep.eval import extract_features

    labels = torch.zeros(images.shape[0], dtype=torch.long) if isinstance(images, Tensor) else None
    emb, _ = extract_features(encoder_fn, images, labels, batch_size=batch_size, progress=progress, desc="embed")
    seeds = None
    if seed_images is not None:
        seeds, _ = extract_features(encoder_fn, seed_images, torch.zeros(seed_images.shape[0], dtype=torch.long),
                                    batch_size=batch_size, progress=progress, desc="embed seeds")
    return curate_embeddings(emb, seeds=seeds, **kwargs)


def curate_checkpoint(checkpoint: str, out: str, *, overrides=(), seeds_file: str | None = None,
                      progress: bool = True, **kwargs) -> CurationResult:
    """``visrep curate``: embed the training split of a checkpoint's config with its method's
    ``features`` (``checkpoint="raw"`` with ``--set data.name=...``: raw pixels), curate, write the list."""
    from visrep.data.splits import eval_images, load_split, uint8_eval_transform
    from visrep.runner import load_trained, raw_pixel_features

    overrides = ["data.subset_file=null", *overrides]  # indices refer to the whole training split
    if checkpoint == "raw":
        cfg = data_only_config(overrides)
        encoder = raw_pixel_features
    else:
        cfg, method, _ = load_trained(checkpoint, overrides)
        encoder = method.features
    ds = load_split(cfg, "train", transform=uint8_eval_transform(cfg.data.image_size))
    images, _ = eval_images(ds, cfg.data.image_size)
    names = [str(s[0]) for s in ds.samples] if hasattr(ds, "samples") else None
    seed_images = None
    if seeds_file is not None:
        seed_idx = read_file_list(seeds_file, names)
        if not isinstance(images, Tensor):
            raise ValueError("--seeds needs an in-memory dataset")
        seed_images = images[torch.as_tensor(seed_idx)]
    result = curate(encoder, images, progress=progress, seed_images=seed_images, **kwargs)
    write_file_list(out, result.indices, names)
    return result


def data_only_config(overrides=()):
    """A config with only a ``data`` section (from ``data.<key>=value`` overrides), for raw pixels."""
    from types import SimpleNamespace

    from visrep.config import ConfigError, DataConfig, _build, _set_dotted, parse_overrides

    tree: dict = {}
    for key, value in parse_overrides(list(overrides)):
        if not key.startswith("data."):
            raise ConfigError(f"curate raw: only data.<key> overrides apply, got {key!r}")
        _set_dotted(tree, key, value)
    return SimpleNamespace(data=_build(DataConfig, tree.get("data", {}), "data"))
