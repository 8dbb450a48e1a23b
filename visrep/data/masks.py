"""I-JEPA multi-block masking: one or more large *context* blocks and several small *target* blocks.

``MultiBlockMaskCollator`` is a ``collate_fn`` returning ``(collated_batch, masks_enc, masks_pred)``,
lists of ``LongTensor [B, K]`` kept patch indices, as the official I-JEPA ``MaskCollator``.

    per batch: one (scale, aspect ratio) draw for all target blocks, one for all context blocks
    per sample: place npred target blocks, then a context block minus their union
    truncate every mask of the batch to the shortest one (one length per kind)

``mode="default"``: always terminates, context and targets never overlap, corners over all valid
positions, vectorised. ``mode="official"``: the reference's masks bit for bit (same RNG calls),
overlaps included, but a ``RuntimeError`` where the reference would loop forever.
``context="complement"`` (IWM): every patch outside the targets, cut by a random subset.
Specification and notes: docs/data/masks.md
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

logger = logging.getLogger(__name__)

FALLBACK_WARNING = "Valid mask not found, decreasing acceptable-regions"

__all__ = ["IBOTMaskGenerator", "MultiBlockMaskCollator", "block_masks", "masks_to_indices", "masks_to_random_indices",
           "FALLBACK_WARNING"]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def block_masks(tops: Tensor, lefts: Tensor, size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Boolean masks ``[..., H, W]`` of ``size`` rectangles with top-left corners ``(tops, lefts)``."""
    (h, w), (H, W) = size, grid
    rows = torch.arange(H, device=tops.device)
    cols = torch.arange(W, device=tops.device)
    in_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + h)  # [..., H]
    in_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + w)  # [..., W]
    return in_rows[..., :, None] & in_cols[..., None, :]


def masks_to_indices(masks: Tensor) -> list[Tensor]:
    """Boolean masks ``[B, n, H, W]`` -> list of ``n`` LongTensors ``[B, K]`` of kept indices.

    Indices are row-major and ascending; every mask is truncated to ``K`` = the smallest mask size over
    the whole ``[B, n]`` (the reference collation).
    """
    B, n = masks.shape[:2]
    flat = masks.flatten(2)
    k = int(flat.sum(-1).min())
    first_k = flat & (flat.cumsum(-1) <= k)  # the k first kept patches of every mask
    idx = first_k.nonzero()[:, 2].view(B, n, k)  # nonzero is row-major: ascending within each mask
    return [idx[:, i].contiguous() for i in range(n)]


def masks_to_random_indices(masks: Tensor) -> list[Tensor]:
    """As :func:`masks_to_indices`, but each mask keeps a uniformly random subset of ``K`` of its patches
    (global RNG; ascending), not its ``K`` first in row-major order."""
    B, n = masks.shape[:2]
    flat = masks.flatten(2)
    k = int(flat.sum(-1).min())
    scores = torch.where(flat, torch.rand(flat.shape), torch.full(flat.shape, 2.0))  # outside the mask: last
    idx = scores.argsort(-1)[..., :k].sort(-1).values
    return [idx[:, i].contiguous() for i in range(n)]


class MultiBlockMaskCollator:
    """I-JEPA multi-block mask collator (see the module docstring for the two modes).

    Args:
        input_size: image size (int or ``(H, W)``) in pixels.
        patch_size: patch size in pixels; the mask grid is ``input_size // patch_size``.
        enc_mask_scale: range of the context-block area as a fraction of the grid.
        pred_mask_scale: range of the target-block area as a fraction of the grid.
        aspect_ratio: range of the target-block aspect ratio ``h / w``.
        nenc: number of context blocks per sample.
        npred: number of target blocks per sample.
        min_keep: official: every block keeps ``> min_keep`` patches (may hang in the reference; raises
            here). default: every context mask keeps ``>= min_keep`` patches (capped, see module doc).
        allow_overlap: if True the context block is not constrained by the targets.
        mode: ``"default"`` (safe, never overlaps, always terminates) or ``"official"`` (bit-exact
            reference behaviour).
        base_collate: collate function applied to the batch itself.
        exclusive_corner: corner upper bound exclusive (reference quirk). ``None``: True for
            ``"official"``, False for ``"default"``.
        max_tries: context-position tries before the fallback (reference: 20).
        max_rounds: default mode only: re-draws of a failing sample before the target size is shrunk.
        context: ``"block"`` (I-JEPA: a context block minus the targets) or ``"complement"`` (IWM's
            paper: every patch outside the targets; default mode, one context mask, ``enc_mask_scale``
            unused; a sample whose complement keeps fewer than ``min_keep`` patches is re-drawn; cut to
            the batch's shortest by a random subset, :func:`masks_to_random_indices`).

    Block sizes come from ``torch.Generator().manual_seed(step)``, with ``step`` a counter shared by all
    dataloader workers; ``set_step(i)`` makes the next batch use seed ``i``.

    After each batch, ``last_info`` holds ``step``, ``p_size_sampled``, ``p_size`` (after any default-mode
    shrink), ``e_size``, ``fallbacks`` (official constraint relaxations; always 0 in default mode) and, in
    default mode, ``redrawn`` (sample re-draws) and ``shrinks`` (target-size reductions).
    Official-mode bit-exactness needs ``exclusive_corner`` left at its default (True).
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = (224, 224),
        patch_size: int | Sequence[int] = 16,
        enc_mask_scale: Sequence[float] = (0.85, 1.0),
        pred_mask_scale: Sequence[float] = (0.15, 0.2),
        aspect_ratio: Sequence[float] = (0.75, 1.5),
        nenc: int = 1,
        npred: int = 4,
        min_keep: int = 10,
        allow_overlap: bool = False,
        mode: str = "default",
        base_collate: Callable[[list], Any] = default_collate,
        exclusive_corner: bool | None = None,
        max_tries: int = 20,
        max_rounds: int = 10,
        context: str = "block",
    ):
        if mode not in ("default", "official"):
            raise ValueError(f"mode must be 'default' or 'official', got {mode!r}")
        if context not in ("block", "complement"):
            raise ValueError(f"context must be 'block' or 'complement', got {context!r}")
        if context == "complement" and (mode != "default" or nenc != 1):
            raise ValueError("context='complement' needs mode='default' and one context mask (nenc=1)")
        self.context = context
        (ih, iw), (ph, pw) = _pair(input_size), _pair(patch_size)
        self.height, self.width = ih // ph, iw // pw
        if self.height < 2 or self.width < 2:
            raise ValueError(f"mask grid {self.height}x{self.width} is too small (need >= 2x2)")
        if nenc < 1 or npred < 1:
            raise ValueError("nenc and npred must be >= 1")
        self.enc_mask_scale = tuple(float(s) for s in enc_mask_scale)
        self.pred_mask_scale = tuple(float(s) for s in pred_mask_scale)
        self.aspect_ratio = tuple(float(a) for a in aspect_ratio)
        self.nenc, self.npred = int(nenc), int(npred)
        self.min_keep = int(min_keep)
        self.allow_overlap = bool(allow_overlap)
        self.mode = mode
        self.base_collate = base_collate
        self.exclusive_corner = (mode == "official") if exclusive_corner is None else bool(exclusive_corner)
        self.max_tries = int(max_tries)
        self.max_rounds = int(max_rounds)
        if self.max_tries < 1 or self.max_rounds < 0:
            raise ValueError("max_tries must be >= 1 and max_rounds >= 0")
        self._step = multiprocessing.Value("i", -1)  # shared with dataloader workers
        self._capped_warned = False
        self.last_info: dict[str, Any] = {}

        if mode == "default" and not self.allow_overlap and context == "block":
            # smallest possible context block (sizes are monotone in the uniform draw)
            eh, ew = self.block_size_at(0.0, self.enc_mask_scale, (1.0, 1.0))
            if eh * ew <= self.npred:
                raise ValueError(
                    f"grid {self.height}x{self.width} too small: a {eh}x{ew} context block cannot keep a "
                    f"patch next to {self.npred} target blocks")

    # ------------------------------------------------------------------ step counter
    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def current_step(self) -> int:
        """Generator seed used by the most recent batch (-1 before the first)."""
        return self._step.value

    def set_step(self, step: int) -> None:
        """Make the next batch sample its block sizes with generator seed ``step`` (e.g. on resume)."""
        with self._step.get_lock():
            self._step.value = int(step) - 1

    def _next_step(self) -> int:
        with self._step.get_lock():
            self._step.value += 1
            return self._step.value

    # ------------------------------------------------------------------ sizes
    def sample_block_size(self, generator, scale: Sequence[float], aspect_ratio: Sequence[float]) -> tuple[int, int]:
        """Block ``(h, w)`` from ONE uniform draw shared by scale and aspect ratio (reference quirk)."""
        return self.block_size_at(torch.rand(1, generator=generator).item(), scale, aspect_ratio)

    def block_size_at(self, u: float, scale: Sequence[float], aspect_ratio: Sequence[float]) -> tuple[int, int]:
        """Block ``(h, w)`` for the uniform draw ``u`` (default mode clamps sizes to >= 1)."""
        s = scale[0] + u * (scale[1] - scale[0])
        n_keep = int(self.height * self.width * s)
        ar = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
        h = int(round(math.sqrt(n_keep * ar)))
        w = int(round(math.sqrt(n_keep / ar)))
        h = min(h, self.height - 1)  # the reference decrements until h < H
        w = min(w, self.width - 1)
        if self.mode == "default":
            h, w = max(h, 1), max(w, 1)
        return h, w

    def _corner_high(self, size: tuple[int, int]) -> tuple[int, int]:
        extra = 0 if self.exclusive_corner else 1
        return self.height - size[0] + extra, self.width - size[1] + extra

    # ------------------------------------------------------------------ public API
    def sample_boolean_masks(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Masks for one batch BEFORE collation: ``(enc [B, nenc, H, W], pred [B, npred, H, W])`` bool.

        Advances the step counter; ``self.last_info`` records the sizes used and fallback counts.
        """
        step = self._next_step()
        g = torch.Generator()
        g.manual_seed(step)
        p_size = self.sample_block_size(g, self.pred_mask_scale, self.aspect_ratio)
        e_size = self.sample_block_size(g, self.enc_mask_scale, (1.0, 1.0))
        if self.mode == "official":
            enc, pred, info = self._sample_official(batch_size, p_size, e_size)
        elif self.context == "complement":
            enc, pred, info = self._sample_complement(batch_size, p_size)
            e_size = None
        else:
            enc, pred, info = self._sample_default(batch_size, p_size, e_size)
        self.last_info = {"step": step, "p_size_sampled": p_size, "e_size": e_size, **info}
        return enc, pred

    def sample(self, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
        """Collated masks for a batch of ``batch_size``: ``(masks_enc, masks_pred)``, lists of ``[B, K]``."""
        enc, pred = self.sample_boolean_masks(batch_size)
        # a complement context cut to the batch's shortest keeps a random subset (the first K row-major
        # patches would always drop the bottom of the image); I-JEPA's block contexts keep the first K
        cut = masks_to_random_indices if self.context == "complement" else masks_to_indices
        return cut(enc), masks_to_indices(pred)

    def __call__(self, batch: list) -> tuple[Any, list[Tensor], list[Tensor]]:
        collated = self.base_collate(batch)
        masks_enc, masks_pred = self.sample(len(batch))
        return collated, masks_enc, masks_pred

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.height}x{self.width}, mode={self.mode!r}, context={self.context!r}, "
                f"enc_mask_scale={self.enc_mask_scale}, pred_mask_scale={self.pred_mask_scale}, "
                f"aspect_ratio={self.aspect_ratio}, nenc={self.nenc}, npred={self.npred}, "
                f"min_keep={self.min_keep}, allow_overlap={self.allow_overlap})")

    # ------------------------------------------------------------------ official mode
    def _rect_bits(self, size: tuple[int, int], hi: tuple[int, int]) -> list[list[int]]:
        """``bits[top][left]``: a block as a Python-int bitmask over the row-major grid."""
        (h, w), W = size, self.width
        col = sum(1 << (r * W) for r in range(h)) * ((1 << w) - 1)  # block at (0, 0)
        return [[col << (t * W + left) for left in range(hi[1])] for t in range(hi[0])]

    def _sample_official(self, B: int, p_size, e_size):
        (ph, pw), (eh, ew) = p_size, e_size
        H, W, npred, nenc, min_keep = self.height, self.width, self.npred, self.nenc, self.min_keep
        if ph * pw <= min_keep or eh * ew <= min_keep:
            raise RuntimeError(
                f"official I-JEPA MaskCollator would loop forever at step {self._step.value}: target block "
                f"{ph}x{pw} / context block {eh}x{ew} must keep more than min_keep={min_keep} patches. "
                f"Lower min_keep, enlarge the grid, or use mode='default'.")
        p_hi, e_hi = self._corner_high(p_size), self._corner_high(e_size)
        e_bits = self._rect_bits(e_size, e_hi)
        p_bits = self._rect_bits(p_size, p_hi)
        pred_pos, enc_pos, n_kept = [], [], []  # corners of targets / contexts, constraints kept per context
        fallbacks = 0
        for _ in range(B):
            # same global-RNG call order as the reference: top then left, targets then context tries
            unions = [0]  # unions[n]: bitmask of the first n targets
            for _ in range(npred):  # area > min_keep: the first try is always valid
                top = int(torch.randint(0, p_hi[0], (1,)))
                left = int(torch.randint(0, p_hi[1], (1,)))
                pred_pos.append((top, left))
                unions.append(unions[-1] | p_bits[top][left])
            for _ in range(nenc):
                relaxed, timeout = 0, self.max_tries
                while True:
                    top = int(torch.randint(0, e_hi[0], (1,)))
                    left = int(torch.randint(0, e_hi[1], (1,)))
                    n = 0 if self.allow_overlap else max(npred - relaxed, 0)
                    if (e_bits[top][left] & ~unions[n]).bit_count() > min_keep:
                        break
                    timeout -= 1
                    if timeout == 0:  # n == 0 is unconstrained and always valid, so this is bounded
                        relaxed += 1
                        timeout = self.max_tries
                        fallbacks += 1
                        logger.warning('Mask generator says: "%s [%d]"', FALLBACK_WARNING, relaxed)
                enc_pos.append((top, left))
                n_kept.append(n)
        pp = torch.tensor(pred_pos).view(B, npred, 2)
        ep = torch.tensor(enc_pos).view(B, nenc, 2)
        pred = block_masks(pp[..., 0], pp[..., 1], p_size, (H, W))
        enc = block_masks(ep[..., 0], ep[..., 1], e_size, (H, W))
        # subtract the union of the first n targets (n = constraints still active when accepted)
        unions = torch.cat([torch.zeros(B, 1, H, W, dtype=torch.bool), pred.cumsum(1) > 0], 1)
        n = torch.tensor(n_kept).view(B, nenc)
        enc &= ~unions[torch.arange(B)[:, None], n]
        return enc, pred, {"p_size": p_size, "fallbacks": fallbacks}

    # ------------------------------------------------------------------ default mode
    def _context_min(self, e_size) -> int:
        k = min(self.min_keep, e_size[0] * e_size[1] - self.npred)
        if k < self.min_keep and not self._capped_warned:
            self._capped_warned = True
            warnings.warn(
                f"min_keep={self.min_keep} is not achievable next to {self.npred} targets in a "
                f"{e_size[0]}x{e_size[1]} context block on a {self.height}x{self.width} grid; using {k}",
                stacklevel=3)
        return max(k, 1)

    def _draw_corners(self, shape: tuple[int, ...], size) -> tuple[Tensor, Tensor]:
        hi = self._corner_high(size)
        return torch.randint(0, hi[0], shape), torch.randint(0, hi[1], shape)

    def _sample_default(self, B: int, p_size, e_size):
        grid, nenc, npred, tries = self.grid, self.nenc, self.npred, self.max_tries
        eh, ew = e_size
        if self.allow_overlap:
            pred = block_masks(*self._draw_corners((B, npred), p_size), p_size, grid)
            enc = block_masks(*self._draw_corners((B, nenc), e_size), e_size, grid)
            return enc, pred, {"p_size": p_size, "fallbacks": 0, "redrawn": 0, "shrinks": 0}
        k = self._context_min(e_size)
        size, shrinks, redrawn = p_size, 0, 0
        while True:
            done: list[tuple[Tensor, Tensor, Tensor]] = []  # (sample ids, targets, contexts) per round
            todo = torch.arange(B)
            for rnd in range(self.max_rounds + 1):
                n = len(todo)
                redrawn += n if rnd else 0
                targets = block_masks(*self._draw_corners((n, npred), size), size, grid)  # [n, npred, H, W]
                union = targets.any(1)  # [n, H, W]
                # context patches left by a context block at every corner: box sums of the free cells
                S = torch.nn.functional.pad((~union).to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))
                kept = S[:, eh:, ew:] - S[:, :-eh, ew:] - S[:, eh:, :-ew] + S[:, :-eh, :-ew]
                tops, lefts = self._draw_corners((n, nenc, tries), e_size)  # `tries` candidates per block
                flat = (tops * kept.shape[2] + lefts).view(n, -1)
                valid = (kept.flatten(1).gather(1, flat) >= k).view(n, nenc, tries)
                first = valid.to(torch.uint8).argmax(-1, keepdim=True)  # first valid try, as the reference
                top, left = tops.gather(-1, first)[..., 0], lefts.gather(-1, first)[..., 0]
                contexts = block_masks(top, left, e_size, grid) & ~union[:, None]
                ok = valid.any(-1).all(-1)  # [n]
                if rnd == 0 and bool(ok.all()):
                    return contexts, targets, {"p_size": size, "fallbacks": 0, "redrawn": 0, "shrinks": shrinks}
                # (index_select rather than boolean indexing / index_put: far cheaper on busy CPUs)
                good, bad = ok.nonzero()[:, 0], (~ok).nonzero()[:, 0]
                done.append((todo.index_select(0, good), targets.index_select(0, good),
                             contexts.index_select(0, good)))
                todo = todo.index_select(0, bad)
                if len(todo) == 0:
                    order = torch.cat([d[0] for d in done]).argsort()
                    pred = torch.cat([d[1] for d in done]).index_select(0, order)
                    enc = torch.cat([d[2] for d in done]).index_select(0, order)
                    return enc, pred, {"p_size": size, "fallbacks": 0, "redrawn": redrawn, "shrinks": shrinks}
            # some sample failed every round: shrink the batch's target size and re-draw the batch.
            # With 1x1 targets every context block keeps >= area - npred >= k patches, so this ends.
            h, w = size
            if h == 1 and w == 1:  # unreachable: k <= context area - npred
                raise RuntimeError("MultiBlockMaskCollator: no valid mask with 1x1 targets")
            size = (h - 1, w) if h >= w and h > 1 else (h, w - 1)
            shrinks += 1


    # ------------------------------------------------------------------ complement context (IWM)
    def _sample_complement(self, B: int, p_size):
        """Targets as :meth:`_sample_default` draws them; the context is every patch outside their union."""
        grid, npred = self.grid, self.npred
        k = max(1, min(self.min_keep, self.height * self.width - npred))
        size, shrinks, redrawn = p_size, 0, 0
        while True:
            pred = torch.zeros(B, npred, *grid, dtype=torch.bool)
            todo = torch.arange(B)
            for rnd in range(self.max_rounds + 1):
                n = len(todo)
                redrawn += n if rnd else 0
                targets = block_masks(*self._draw_corners((n, npred), size), size, grid)  # [n, npred, H, W]
                ok = (~targets.any(1)).flatten(1).sum(1) >= k
                good = ok.nonzero()[:, 0]
                pred.index_copy_(0, todo.index_select(0, good), targets.index_select(0, good))
                todo = todo.index_select(0, (~ok).nonzero()[:, 0])
                if len(todo) == 0:
                    enc = ~pred.any(1, keepdim=True)
                    return enc, pred, {"p_size": size, "fallbacks": 0, "redrawn": redrawn, "shrinks": shrinks}
            h, w = size  # some sample failed every round: shrink the targets (1x1 always leaves >= k)
            size = (h - 1, w) if h >= w and h > 1 else (h, w - 1)
            shrinks += 1


# --------------------------------------------------------------------------------------------
# iBOT / DINOv2 block-wise masks
# --------------------------------------------------------------------------------------------
class IBOTMaskGenerator:
    """DINOv2's iBOT masks (``dinov2/data/masking.py:MaskingGenerator`` + the mask part of
    ``dinov2/data/collate.py:collate_data_and_cast``), bit-exact with the official code for the same
    ``random.Random`` state.

    For a batch of ``n`` global crops: ``m = int(n * mask_probability)`` crops are masked; crop ``i``
    of them requests ``int(N * U(r_i, r_{i+1}))`` patches with ``r = linspace(ratio_min, ratio_max, m + 1)``
    (float32, stratified ratios); the other crops get empty masks; the list is shuffled. Each mask is
    grown by BEiT blocks: area ``U(min_num_patches, remaining)`` (capped at ``max_num_patches``),
    log-uniform aspect in ``(min_aspect, 1 / min_aspect)``, a block is kept if it adds between 1 and
    ``remaining`` new patches; 10 failed tries stop the mask early (it may get fewer patches than
    requested). ``max_num_patches=None``: the official training expression
    ``0.5 * img // p * img // p``, i.e. ``floor(g / 2) * g`` on a ``g x g`` grid (not ``0.5 N`` for odd
    ``g``; pass ``0.5 * N`` for the paper's value).

    The block growth is a Python loop over each masked crop's few blocks (as the official collate);
    it runs in ``prepare_batch`` on CPU, outside the model's hot path.
    """

    def __init__(self, grid: int | Sequence[int], ratio: tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = _pair(grid)
        self.num_patches = self.height * self.width
        if not 0 <= ratio[0] <= ratio[1] <= 1:
            raise ValueError(f"mask ratio must satisfy 0 <= min <= max <= 1, got {ratio}")
        if not 0 <= mask_probability <= 1:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mask_probability = mask_probability
        if max_num_patches is None:
            max_num_patches = (self.height // 2) * self.width
        self.max_num_patches = max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _block(self, mask: list[list[bool]], max_mask_patches: float, rng) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                rows = mask[top:top + h]
                num_masked = sum(sum(r[left:left + w]) for r in rows)
                if 0 < h * w - num_masked <= max_mask_patches:
                    for r in rows:
                        delta += w - sum(r[left:left + w])
                        r[left:left + w] = [True] * w
                if delta > 0:
                    break
        return delta

    def mask(self, num_masking_patches: int, rng) -> Tensor:
        """One bool mask ``[H, W]`` with (at most) ``num_masking_patches`` patches (``MaskingGenerator``)."""
        mask = [[False] * self.width for _ in range(self.height)]
        count = 0
        while count < num_masking_patches:
            delta = self._block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask, dtype=torch.bool)

    def sample(self, n: int, rng) -> dict[str, Any]:
        """Masks for ``n`` global crops: ``masks`` bool ``[n, N]`` (row-major), ``indices`` (flat
        indices into ``[n * N]``), ``weights`` (float32 ``1 / #masked in the image`` per masked patch)
        and ``upperbound`` (the official bound on the number of masked patches)."""
        n_masked = int(n * self.mask_probability)
        probs = torch.linspace(*self.ratio, n_masked + 1)
        masks, upperbound = [], 0
        for i in range(n_masked):
            lo, hi = probs[i], probs[i + 1]
            masks.append(self.mask(int(self.num_patches * rng.uniform(lo, hi)), rng))
            upperbound += int(self.num_patches * hi)
        masks += [torch.zeros(self.height, self.width, dtype=torch.bool)] * (n - n_masked)
        rng.shuffle(masks)
        flat = torch.stack(masks).flatten(1) if masks else torch.zeros(0, self.num_patches, dtype=torch.bool)
        return {"masks": flat, "indices": flat.flatten().nonzero().flatten(),
                "weights": (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat],
                "upperbound": upperbound}

    def __repr__(self) -> str:
        return (f"IBOTMaskGenerator(grid=({self.height}, {self.width}), ratio={self.ratio}, "
                f"mask_probability={self.mask_probability}, max_num_patches={self.max_num_patches})")
