"""The I-JEPA multi-block mask collator (``mode="official"``) matches the reference ``MaskCollator``.

Generic over every ``ijepa_maskcollator`` fixture: the collator is built from the JSON ``config``
(``MaskCollator_kwargs``, ``torch_manual_seed``, ``n_batches``, ``batch_size``) and run the way the
fixture was generated (``torch.manual_seed(seed)`` right before construction; batch ``i`` draws its
block sizes from generator seed ``i``).

* ``out.p_size`` / ``out.e_size``: exact (tolerance atol 0).
* distribution keys (pre-truncation token counts, collated lengths, overlap, fallbacks): means within
  4 combined standard errors (the sidecar tolerance). Samples of one batch share their block sizes, so
  the standard errors are computed over per-batch means (cluster-robust; the plain per-sample stderr
  would understate the uncertainty).
* ``out.exact.*``: bitwise, because the official mode replays the reference global-RNG call sequence;
  for the same reason the whole recorded stream (counts, sizes, fallbacks) is checked bitwise too.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.data.masks import MultiBlockMaskCollator, masks_to_indices

KIND = "ijepa_maskcollator"
N_STDERR = 4.0


def _kwargs(fx) -> dict:
    kw = dict(fx.config["MaskCollator_kwargs"])
    for key, value in kw.items():
        if isinstance(value, list):
            kw[key] = tuple(value)
    return kw


def _fresh_collator(fx) -> MultiBlockMaskCollator:
    torch.manual_seed(int(fx.config.get("torch_manual_seed", 0)))
    return MultiBlockMaskCollator(**_kwargs(fx), mode="official")


def _n_batches_and_size(fx) -> tuple[int, int]:
    cfg = fx.config
    n = int(cfg["n_batches"]) if "n_batches" in cfg else fx.tensors["out.p_size"].shape[0]
    b = int(cfg["batch_size"]) if "batch_size" in cfg else fx.tensors["out.ctx_count"].shape[1]
    return n, b


def _to_bool(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Index masks ``[..., K]`` -> boolean ``[..., n]``."""
    return torch.zeros(*idx.shape[:-1], n, dtype=torch.bool).scatter_(-1, idx, True)


@functools.cache
def _run(path) -> dict[str, torch.Tensor]:
    """Our official-mode collator over the fixture's whole stream, in the fixture's ``out.*`` layout."""
    fx = load_fixture(path)
    n_batches, batch_size = _n_batches_and_size(fx)
    collator = _fresh_collator(fx)
    rec: dict[str, list] = {k: [] for k in ("p_size", "e_size", "ctx_count", "pred_count", "overlap",
                                            "collated_ctx_len", "collated_pred_len", "collated_overlap",
                                            "fallback_warnings")}
    for _ in range(n_batches):
        enc, pred = collator.sample_boolean_masks(batch_size)  # [B, nenc, H, W], [B, npred, H, W]
        info = collator.last_info
        rec["p_size"].append(torch.tensor(info["p_size"]))
        rec["e_size"].append(torch.tensor(info["e_size"]))
        rec["fallback_warnings"].append(torch.tensor(info["fallbacks"]))
        rec["ctx_count"].append(enc.flatten(2).sum(-1))
        rec["pred_count"].append(pred.flatten(2).sum(-1))
        rec["overlap"].append((enc[:, :, None] & pred[:, None]).flatten(3).sum(-1))  # [B, nenc, npred]
        masks_enc, masks_pred = masks_to_indices(enc), masks_to_indices(pred)
        rec["collated_ctx_len"].append(torch.tensor(masks_enc[0].shape[1]))
        rec["collated_pred_len"].append(torch.tensor(masks_pred[0].shape[1]))
        # |ctx ∩ tgt| of the truncated index masks, summed over samples and block pairs
        kept_enc = _to_bool(torch.stack(masks_enc, 1), enc[0, 0].numel())  # [B, nenc, H*W]
        kept_pred = _to_bool(torch.stack(masks_pred, 1), enc[0, 0].numel())  # [B, npred, H*W]
        rec["collated_overlap"].append((kept_enc[:, :, None] & kept_pred[:, None]).sum())
    return {f"out.{k}": torch.stack(v).to(torch.int64) for k, v in rec.items()}


def _per_batch(key: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-batch means used for the stderr, all observations) of one distribution key."""
    t = t.double()
    if key == "out.overlap":  # summary: overlap tokens per sample (summed over context/target pairs)
        t = t.flatten(2).sum(-1)
    return t.flatten(1).mean(1) if t.dim() > 1 else t, t.flatten()


def _mean_stderr(key: str, t: torch.Tensor) -> tuple[float, float]:
    batch_means, values = _per_batch(key, t)
    n = batch_means.numel()
    se = float(batch_means.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return float(values.mean()), se


def _assert_same_mean(name: str, what: str, ours: tuple[float, float], ref: tuple[float, float]):
    (m1, s1), (m2, s2) = ours, ref
    bound = N_STDERR * math.hypot(s1, s2) + 1e-9
    assert abs(m1 - m2) <= bound, (f"{name}:{what}: mean {m1:.4f} vs reference {m2:.4f} "
                                   f"(|diff| {abs(m1 - m2):.4f} > {N_STDERR:g} combined stderr = {bound:.4f})")


DISTRIBUTION_KEYS = ("out.ctx_count", "out.pred_count", "out.collated_ctx_len", "out.collated_pred_len",
                     "out.overlap", "out.collated_overlap", "out.fallback_warnings")


@pytest.mark.parametrize("path", fixtures_of_kind(KIND))
def test_ijepa_maskcollator_distribution(path):
    fx = load_fixture(path)
    ours = _run(path)
    for key in ("out.p_size", "out.e_size"):  # exact per batch
        fx.assert_close(key, ours[key])
    checked = 0
    for key in DISTRIBUTION_KEYS:
        if key not in fx.tensors:
            continue
        ref = fx.tensors[key]
        assert ours[key].shape == ref.shape, f"{fx.name}:{key}: shape {tuple(ours[key].shape)} != {tuple(ref.shape)}"
        _assert_same_mean(fx.name, key, _mean_stderr(key, ours[key]), _mean_stderr(key, ref))
        checked += 1
    # rates: samples whose context overlaps a target, batches with a fallback
    for key, rate in (("out.overlap", lambda t: (t.flatten(2).sum(-1) > 0)),
                      ("out.fallback_warnings", lambda t: (t > 0))):
        if key in fx.tensors:
            _assert_same_mean(fx.name, f"rate({key} > 0)", _mean_stderr("rate", rate(ours[key])),
                              _mean_stderr("rate", rate(fx.tensors[key])))
    assert checked >= 4, f"{fx.name}: too few distribution keys found"


@pytest.mark.parametrize("path", fixtures_of_kind(KIND))
def test_ijepa_maskcollator_exact_masks(path):
    """``out.exact.batch<i>.*`` through the public ``__call__`` (collated ``[B, K]`` index masks)."""
    fx = load_fixture(path)
    _, batch_size = _n_batches_and_size(fx)
    exact = sorted({int(k.split(".")[2][len("batch"):]) for k in fx.tensors if k.startswith("out.exact.batch")})
    if not exact:
        pytest.skip("fixture has no exact masks")
    collator = _fresh_collator(fx)
    batch = [(torch.zeros(3), i) for i in range(batch_size)]
    for i in range(max(exact) + 1):
        collated, masks_enc, masks_pred = collator(batch)
        assert collated[0].shape == (batch_size, 3) and torch.equal(collated[1], torch.arange(batch_size))
        if i not in exact:
            continue
        for name, masks in (("masks_enc", masks_enc), ("masks_pred", masks_pred)):
            expected = fx.listed(f"out.exact.batch{i}.{name}")
            assert len(masks) == len(expected), f"{fx.name}: batch{i}.{name}: {len(masks)} blocks != {len(expected)}"
            for j, (m, e) in enumerate(zip(masks, expected)):
                assert m.dtype == torch.int64 and m.shape == e.shape, \
                    f"{fx.name}: batch{i}.{name}.{j}: {m.shape} != {e.shape}"
                assert torch.equal(m, e), f"{fx.name}: batch{i}.{name}.{j} differs"


@pytest.mark.parametrize("path", fixtures_of_kind(KIND))
def test_ijepa_maskcollator_exact_stream(path):
    """Same RNG protocol as the reference, so every recorded per-batch quantity is bitwise equal."""
    fx = load_fixture(path)
    ours = _run(path)
    for key, value in ours.items():
        if key in fx.tensors:
            assert torch.equal(value, fx.tensors[key]), f"{fx.name}:{key}: not bitwise equal to the reference"
