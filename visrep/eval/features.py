"""Frozen-feature extraction for any encoder.

``extract_features`` turns an encoder (any callable ``images -> [N, D]``) and a dataset into a pair
``(features float32 [N, D], labels int64 [N])`` on the CPU, optionally cached to a ``.pt`` file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

CACHE_FORMAT = 1


def _as_label_tensor(labels: Any) -> Tensor:
    if isinstance(labels, Tensor):
        return labels.detach().reshape(-1).to("cpu", torch.int64)
    return torch.as_tensor(labels, dtype=torch.int64).reshape(-1)


def _to_2d_float(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"encoder_fn must return a Tensor of features [N, D], got {type(out).__name__}; "
            "wrap the encoder so that it returns the pooled features"
        )
    if out.ndim == 1:
        out = out[:, None]
    elif out.ndim > 2:
        out = out.flatten(1)
    return out.float()


def load_feature_cache(cache_path: str | os.PathLike, cache_key: str | None = None) -> tuple[Tensor, Tensor] | None:
    """Cached ``(feats, labels)`` from ``cache_path`` if it exists and was written with ``cache_key``."""
    path = Path(cache_path)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: recompute and overwrite
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or blob.get("key") != cache_key:
        return None
    return blob["feats"], blob["labels"]


def save_feature_cache(
    cache_path: str | os.PathLike, feats: Tensor, labels: Tensor, cache_key: str | None = None
) -> None:
    """Atomically write ``(feats, labels)`` (temp file in the same folder, then ``os.replace``)."""
    path = Path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": CACHE_FORMAT, "key": cache_key, "feats": feats, "labels": labels}, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def linear_input(vit: nn.Module, x: Tensor, n_blocks: int = 1, avgpool: bool = True) -> Tensor:
    """DINOv2's linear-probe input (``eval/linear.py:create_linear_input`` on
    ``get_intermediate_layers(x, n_blocks, return_class_token=True)``, final norm applied to every block):
    the [CLS] tokens of the last ``n_blocks`` blocks concatenated, then (``avgpool``) the average of the
    last block's patch tokens (registers excluded). ``[N, (n_blocks + avgpool) * D]`` float32."""
    layers = vit.get_intermediate_layers(x, n=n_blocks, return_class_token=True, norm=True)
    out = torch.cat([cls for _, cls in layers], dim=-1)
    if avgpool:
        out = torch.cat([out, layers[-1][0].mean(dim=1)], dim=-1)
    return out.float()


def linear_input_columns(n_blocks: Sequence[int], avgpools: Sequence[bool], dim: int) -> dict[str, Tensor]:
    """Where each of DINOv2's linear-probe inputs lies inside the widest one.

    ``eval/linear.py`` trains one classifier per (n last blocks, avgpool) pair and keeps the best on
    validation. The input of every pair is a set of columns of
    ``linear_input(vit, x, max(n_blocks), any(avgpools))``, which holds the [CLS] of the last
    ``max(n_blocks)`` blocks, oldest first, and then the patch average. Returns ``{name: column indices}``
    in the official sweep order (blocks outer, avgpool inner). The names follow the official classifier
    names (``"1_blocks_avgpool_True"``)."""
    widest = max(n_blocks)
    out = {}
    for n in n_blocks:
        for avgpool in avgpools:
            cls = torch.arange((widest - n) * dim, widest * dim)
            avg = torch.arange(widest * dim, (widest + 1) * dim) if avgpool else cls[:0]
            out[f"{n}_blocks_avgpool_{avgpool}"] = torch.cat([cls, avg])
    return out


@dataclass(frozen=True)
class SweptInput:
    """A probe's feature function that holds several candidate inputs: ``fn`` returns the widest
    features, and ``columns`` maps each input's name to its column indices. The linear probe trains
    every input and keeps the best on its validation split (DINOv2's ``eval/linear.py``)."""

    fn: Callable[[Tensor], Tensor]
    columns: Mapping[str, Tensor]

    def __call__(self, images: Tensor) -> Tensor:
        return self.fn(images)


def _tensor_batches(images: Tensor, labels: Tensor, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


def _loader_batches(dataset, batch_size: int, num_workers: int, pin: bool) -> Iterable[tuple[Tensor, Any]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False,
        num_workers=num_workers, pin_memory=pin, persistent_workers=False,
    )
    for batch in loader:
        if isinstance(batch, dict):
            yield batch["image"], batch["label"]
        else:
            yield batch[0], batch[1]


def extract_features(
    encoder_fn: Callable[[Tensor], Tensor],
    dataset,
    labels: Tensor | None = None,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    cache_path: str | os.PathLike | None = None,
    cache_key: str | None = None,
    desc: str = "features",
    num_workers: int = 0,
    amp: bool = True,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``encoder_fn`` over ``dataset`` and return ``(feats float32 [N, D], labels int64 [N])`` on the CPU.

    ``dataset`` is either a map-style dataset yielding ``(image_tensor, label)`` (batched with a
    ``DataLoader``, ``shuffle=False``) or, as a fast path for in-memory data, a ``Tensor`` of images
    ``[N, ...]`` together with ``labels`` ``[N]``. Images are moved to ``device`` as they are; any
    preprocessing (dtype conversion, normalisation) belongs in ``encoder_fn``.

    Runs under ``torch.inference_mode``; on CUDA the forward pass runs under bf16 autocast (``amp``),
    features are returned in float32. An ``nn.Module`` encoder is put in eval mode for the duration
    and its training flag restored afterwards.

    Caching: with ``cache_path`` the result is stored as a ``.pt`` file holding ``cache_key`` (a
    caller-chosen string that should identify the encoder/checkpoint, dataset and transform). A file
    is reused only when its stored key equals ``cache_key``; otherwise the features are recomputed
    and the file replaced (written to a temp file, then ``os.replace``, so it is never half-written).
    """
    if cache_path is not None:
        cached = load_feature_cache(cache_path, cache_key)
        if cached is not None:
            return cached

    device = torch.device(device)
    if isinstance(dataset, Tensor):
        if labels is None:
            raise ValueError("labels are required when dataset is a Tensor of images")
        labels_t = _as_label_tensor(labels)
        if labels_t.shape[0] != dataset.shape[0]:
            raise ValueError(f"{dataset.shape[0]} images but {labels_t.shape[0]} labels")
        n_total = dataset.shape[0]
        batches = _tensor_batches(dataset, labels_t, batch_size)
    else:
        if labels is not None:
            raise ValueError("labels must be None when dataset yields (image, label) pairs")
        n_total = len(dataset)
        batches = _loader_batches(dataset, batch_size, num_workers, pin=device.type == "cuda")

    use_amp = amp and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    module = encoder_fn if isinstance(encoder_fn, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()

    bar = None
    if progress:
        bar = tqdm(total=n_total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
    feats_out: list[Tensor] = []
    labels_out: list[Tensor] = []
    try:
        with torch.inference_mode(), autocast:
            for images, batch_labels in batches:
                images = images.to(device, non_blocking=True)
                out = _to_2d_float(encoder_fn(images))
                if out.shape[0] != images.shape[0]:
                    raise ValueError(f"encoder returned {out.shape[0]} rows for a batch of {images.shape[0]}")
                feats_out.append(out.to("cpu"))
                labels_out.append(_as_label_tensor(batch_labels))
                if bar is not None:
                    bar.update(images.shape[0])
    finally:
        if bar is not None:
            bar.close()
        if module is not None:
            module.train(was_training)

    if feats_out:
        feats = torch.cat(feats_out).float().contiguous()
        labels_all = torch.cat(labels_out)
    else:
        feats = torch.zeros(0, 0)
        labels_all = torch.zeros(0, dtype=torch.int64)
    # Tensors created under inference_mode cannot be used by autograd later (e.g. by the linear
    # probe); clone outside it so that callers get ordinary tensors.
    feats, labels_all = feats.clone(), labels_all.clone()
    if cache_path is not None:
        save_feature_cache(cache_path, feats, labels_all, cache_key)
    return feats, labels_all


def extract_train_test(
    encoder_fn: Callable[[Tensor], Tensor],
    train_data,
    test_data,
    train_labels: Tensor | None = None,
    test_labels: Tensor | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    name: str = "features",
    **kwargs,
) -> dict[str, Tensor]:
    """Features of a train and a test set as the dict the protocols and ``run_protocols`` take.

    Returns ``{"train_feats", "train_labels", "test_feats", "test_labels"}``. With ``cache_dir`` the
    two halves are cached as ``<cache_dir>/<name>_{train,test}.pt`` under keys ``<cache_key>:train``
    and ``<cache_key>:test``. Other keyword arguments go to ``extract_features``.
    """
    desc = kwargs.pop("desc", name)
    out: dict[str, Tensor] = {}
    for split, data, labels in (("train", train_data, train_labels), ("test", test_data, test_labels)):
        path = Path(cache_dir) / f"{name}_{split}.pt" if cache_dir is not None else None
        key = f"{cache_key}:{split}" if cache_key is not None else None
        feats, labs = extract_features(
            encoder_fn, data, labels, cache_path=path, cache_key=key, desc=f"{desc} {split}", **kwargs
        )
        out[f"{split}_feats"], out[f"{split}_labels"] = feats, labs
    return out
