"""k-NN accuracy of a method's features on fixed subsets during training (``train.online_knn``)."""
from __future__ import annotations

import warnings

import torch

from visrep.data.datasets import in_memory
from visrep.utils import mix_seed


class OnlineKNN:
    """Top-1 k-NN (%) of ``method.features`` with ``samples`` bank images (from the training set) and
    as many queries from ``eval_data`` (else a held-out slice of ``samples // 5`` training images).
    The subsets are drawn once, seeded by ``seed``; returns None when the data has no labels."""

    def __init__(self, train_data, eval_data, samples: int, seed: int, ks, temperature: float, batch_size: int):
        self.train_data, self.eval_data = train_data, eval_data
        self.samples, self.seed, self.ks = samples, seed, list(ks)
        self.temperature, self.batch_size = temperature, batch_size
        self._sets = None

    def _take(self, data, count: int, offset: int = 0):
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x4B4E4E))
        if in_memory(data):
            images, labels = data.tensors()
            idx = torch.randperm(images.shape[0], generator=g)[offset:offset + count]
            return images[idx], torch.as_tensor(labels)[idx]
        idx = torch.randperm(len(data), generator=g)[offset:offset + count].tolist()
        items = [data[i] for i in idx]
        return torch.stack([torch.as_tensor(it[0]) for it in items]), torch.as_tensor([int(it[1]) for it in items])

    def _make_sets(self):
        n = self.samples
        try:
            if self.eval_data is not None:
                return self._take(self.train_data, n), self._take(self.eval_data, n)
            return self._take(self.train_data, n), self._take(self.train_data, max(1, n // 5), offset=n)
        except Exception as e:  # e.g. a dataset without labels
            warnings.warn(f"online k-NN skipped: cannot take (image, label) samples ({type(e).__name__}: {e})",
                          stacklevel=3)
            return []

    @torch.no_grad()
    def __call__(self, method, device, autocast) -> dict[str, float] | None:
        from visrep.eval.knn import knn_classify

        if self._sets is None:
            self._sets = self._make_sets()
        if not self._sets:
            return None
        (xb, yb), (xq, yq) = self._sets
        was_training = method.training
        method.eval()
        try:
            feats = []
            with torch.inference_mode(), autocast():
                for x in (xb, xq):
                    bs = self.batch_size
                    feats.append(torch.cat([method.features(x[i:i + bs].to(device)).float().flatten(1)
                                            for i in range(0, x.shape[0], bs)]).cpu())
        finally:
            method.train(was_training)
        ks = [k for k in self.ks if k <= xb.shape[0]] or [1]
        acc = knn_classify(feats[0].clone(), yb, feats[1].clone(), yq, ks, temperature=self.temperature)
        return {f"knn_top1_k{k}": float(v) for k, v in acc.items()}


__all__ = ["OnlineKNN"]
