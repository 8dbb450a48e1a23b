"""Multi-block (I-JEPA) mask collator: default-mode guarantees, API and official-mode safety."""
from __future__ import annotations

import logging
import math
import multiprocessing
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from visrep.data.masks import FALLBACK_WARNING, MultiBlockMaskCollator, block_masks, masks_to_indices

PAPER = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5),
             nenc=1, npred=4, min_keep=10)


def _collator(grid: int, **kw) -> MultiBlockMaskCollator:
    return MultiBlockMaskCollator(input_size=grid * 4, patch_size=4, **{**PAPER, **kw})


def _check_collated(masks: list[torch.Tensor], n_blocks: int, batch: int, num_patches: int):
    assert isinstance(masks, list) and len(masks) == n_blocks
    k = masks[0].shape[1]
    for m in masks:
        assert m.dtype == torch.int64 and m.dim() == 2 and m.shape == (batch, k)  # equal length in the batch
        assert k >= 1 and int(m.min()) >= 0 and int(m.max()) < num_patches
        assert bool((m[:, 1:] > m[:, :-1]).all())  # row-major, ascending, no duplicates


def _count_position_draws(monkeypatch) -> list[int]:
    """Count the collator's position draws (every block corner comes from ``torch.randint``)."""
    calls = [0]
    randint = torch.randint

    def counting(*args, **kwargs):
        calls[0] += 1
        return randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", counting)
    return calls


def _assert_default_mode_bounded(col: MultiBlockMaskCollator, draws: int):
    """One default-mode batch used at most (max_rounds + 1) rounds per target size, and the target size
    shrank at most down to 1x1 -- so the loop is bounded whatever the RNG does.

    A round draws target corners and context corners (one ``torch.randint`` each for tops and lefts)."""
    info = col.last_info
    (sh, sw), (ph, pw) = info["p_size_sampled"], info["p_size"]
    assert 1 <= ph <= sh and 1 <= pw <= sw
    assert info["shrinks"] == (sh - ph) + (sw - pw)  # one row or column per shrink
    rounds = draws / 4
    assert rounds == int(rounds) and 1 <= rounds <= (col.max_rounds + 1) * (info["shrinks"] + 1), info
    assert rounds <= (col.max_rounds + 1) * (sh + sw - 1)  # the bound that holds before sampling
    assert info["fallbacks"] == 0  # default mode never relaxes the no-overlap constraint


def _assert_disjoint(masks_enc, masks_pred, num_patches):
    def to_bool(idx):
        return torch.zeros(idx.shape[0], num_patches, dtype=torch.bool).scatter_(1, idx, True)
    for e in masks_enc:
        for p in masks_pred:
            assert not bool((to_bool(e) & to_bool(p)).any()), "context and target overlap"


@pytest.mark.parametrize("grid", [4, 7, 8, 14])
@pytest.mark.parametrize("exclusive_corner", [False, True])
def test_default_mode_never_overlaps_and_keeps_min_keep(grid, exclusive_corner, monkeypatch):
    """Paper config with min_keep=10 (the official collator hangs on 8x8 and loops on 7x7/4x4)."""
    n = grid * grid
    draws = _count_position_draws(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4x4: min_keep is capped (warned once)
        for seed in range(8):
            torch.manual_seed(seed)
            col = _collator(grid, exclusive_corner=exclusive_corner)
            col.set_step(seed * 1000)
            for _ in range(5):
                draws[0] = 0
                enc, pred = col.sample_boolean_masks(8)
                _assert_default_mode_bounded(col, draws[0])
                eh, ew = col.last_info["e_size"]
                k = max(1, min(col.min_keep, eh * ew - col.npred))
                assert enc.shape == (8, 1, grid, grid) and pred.shape == (8, 4, grid, grid)
                assert not bool((enc[:, :, None] & pred[:, None]).any())  # never overlap (pre-collation)
                assert bool((enc.flatten(2).sum(-1) >= k).all())  # min_keep by construction
                assert bool((pred.flatten(2).sum(-1) >= 1).all())
                ph, pw = col.last_info["p_size"]
                assert bool((pred.flatten(2).sum(-1) == ph * pw).all())  # equal-size rectangles
                masks_enc, masks_pred = masks_to_indices(enc), masks_to_indices(pred)
                _check_collated(masks_enc, 1, 8, n)
                _check_collated(masks_pred, 4, 8, n)
                assert masks_enc[0].shape[1] >= k
                _assert_disjoint(masks_enc, masks_pred, n)


def test_default_mode_terminates_when_every_round_fails(monkeypatch):
    """One context try and no re-draws: failing samples force target shrinks, still a bounded loop."""
    draws = _count_position_draws(monkeypatch)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # min_keep capped on the 4x4 grid
        col = _collator(4, min_keep=10, max_tries=1, max_rounds=0)
        shrinks = 0
        for _ in range(20):
            draws[0] = 0
            enc, pred = col.sample_boolean_masks(16)
            _assert_default_mode_bounded(col, draws[0])
            shrinks += col.last_info["shrinks"]
            assert not bool((enc[:, :, None] & pred[:, None]).any())
            assert bool((enc.flatten(2).sum(-1) >= 5).all())  # min_keep capped at 3x3 - 4 targets
    assert shrinks > 0  # the shrink path was exercised


def test_call_returns_collated_batch_and_masks():
    col = _collator(14)
    batch = [(torch.full((3, 56, 56), float(i)), i) for i in range(6)]
    (imgs, labels), masks_enc, masks_pred = col(batch)
    assert imgs.shape == (6, 3, 56, 56) and torch.equal(labels, torch.arange(6))
    _check_collated(masks_enc, 1, 6, 196)
    _check_collated(masks_pred, 4, 6, 196)
    _assert_disjoint(masks_enc, masks_pred, 196)
    masks_enc, masks_pred = col.sample(3)  # without data
    _check_collated(masks_enc, 1, 3, 196)
    _check_collated(masks_pred, 4, 3, 196)


def test_custom_base_collate_and_multiple_context_blocks_and_rectangular_grid():
    col = MultiBlockMaskCollator(input_size=(32, 48), patch_size=4, nenc=2, npred=3, min_keep=4,
                                 base_collate=lambda b: len(b))
    assert col.grid == (8, 12)
    for _ in range(10):
        n, masks_enc, masks_pred = col([0] * 5)
        assert n == 5
        _check_collated(masks_enc, 2, 5, 96)
        _check_collated(masks_pred, 3, 5, 96)
        _assert_disjoint(masks_enc, masks_pred, 96)


def test_allow_overlap_skips_the_constraint():
    torch.manual_seed(0)
    col = _collator(7, allow_overlap=True)
    enc, pred = col.sample_boolean_masks(16)
    eh, ew = col.last_info["e_size"]
    assert bool((enc.flatten(2).sum(-1) == eh * ew).all())  # whole rectangle kept


def test_step_counter_seeds_block_sizes():
    col = _collator(14)
    assert col.current_step == -1
    sizes = []
    for _ in range(6):
        col.sample(2)
        sizes.append((col.last_info["p_size"], col.last_info["e_size"]))
    assert col.current_step == 5
    col.set_step(3)  # the next batch uses generator seed 3
    col.sample(2)
    assert col.current_step == 3 and (col.last_info["p_size"], col.last_info["e_size"]) == sizes[3]
    # block sizes are shared by the batch and depend only on the step, not on the global RNG
    official = _collator(14, mode="official")
    for i in range(6):
        torch.manual_seed(100 + i)
        official.sample(2)
        assert (official.last_info["p_size"], official.last_info["e_size"]) == sizes[i]


def test_same_global_seed_same_masks():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        col = _collator(8)
        outs.append([col.sample(4) for _ in range(3)])
    for (e1, p1), (e2, p2) in zip(*outs):
        assert all(torch.equal(a, b) for a, b in zip(e1 + p1, e2 + p2))


def test_block_size_uses_one_draw_for_scale_and_aspect_ratio():
    col = _collator(14)
    # u=0: n=int(196*0.15)=29, ar=0.75 -> h=round(sqrt(21.75))=5, w=round(sqrt(38.67))=6
    assert col.block_size_at(0.0, col.pred_mask_scale, col.aspect_ratio) == (5, 6)
    # u=1: n=int(196*0.2)=39, ar=1.5 -> (8, 5); a full-size context block is clipped to grid - 1
    assert col.block_size_at(1.0, col.pred_mask_scale, col.aspect_ratio) == (8, 5)
    assert col.block_size_at(1.0, (1.0, 1.0), (1.0, 1.0)) == (13, 13)


def test_masks_to_indices_truncates_to_batch_minimum():
    tops, lefts = torch.tensor([[0], [2]]), torch.tensor([[0], [1]])
    masks = block_masks(tops, lefts, (2, 3), (4, 5))  # [2, 1, 4, 5], 6 patches each
    masks[1, 0, 3, 3] = False  # second mask: 5 patches -> K = 5 for the batch
    (idx,) = masks_to_indices(masks)
    assert idx.tolist() == [[0, 1, 2, 5, 6], [11, 12, 13, 16, 17]]


def test_official_mode_raises_instead_of_hanging():
    """Paper config, min_keep=10, 8x8 grid: the reference never terminates (first at step 3)."""
    torch.manual_seed(0)
    col = _collator(8, mode="official")
    for _ in range(3):
        col.sample(8)  # steps 0-2 are feasible
    # step 3 draws a target block of at most min_keep patches: the reference's retry loop never exits
    ph, pw = col.sample_block_size(torch.Generator().manual_seed(3), col.pred_mask_scale, col.aspect_ratio)
    assert ph * pw <= col.min_keep
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=r"would loop forever at step 3: .*min_keep=10.*mode='default'"):
        col.sample(8)
    assert col.current_step == 3
    assert torch.equal(torch.get_rng_state(), rng)  # detected up front: not one position was drawn
    # the default mode handles the same config and step
    col = _collator(8)
    col.set_step(3)
    masks_enc, masks_pred = col.sample(8)
    _assert_disjoint(masks_enc, masks_pred, 64)


def test_official_mode_fallback_warns_and_can_overlap(caplog, monkeypatch):
    """Reference class defaults on a 32/4 grid: constraints are relaxed and context may overlap targets."""
    torch.manual_seed(0)
    col = MultiBlockMaskCollator(32, 4, enc_mask_scale=(0.2, 0.8), pred_mask_scale=(0.2, 0.8),
                                 aspect_ratio=(0.3, 3.0), nenc=1, npred=2, min_keep=4, mode="official")
    overlap = fallbacks = 0
    draws = _count_position_draws(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="visrep.data.masks"):
        for _ in range(30):
            draws[0] = 0
            enc, pred = col.sample_boolean_masks(8)
            # bounded retries: a context block drops one target constraint after every max_tries failed
            # positions, and with none left the next position is valid; a position is a top and a left
            per_sample = 2 * col.npred + 2 * col.nenc * (col.max_tries * col.npred + 1)
            assert 2 * 8 * (col.npred + col.nenc) <= draws[0] <= 8 * per_sample
            assert col.last_info["fallbacks"] <= 8 * col.nenc * col.npred
            fallbacks += col.last_info["fallbacks"]
            overlap += int((enc[:, :, None] & pred[:, None]).sum())
    assert fallbacks > 0 and overlap > 0
    assert sum(FALLBACK_WARNING in r.getMessage() for r in caplog.records) == fallbacks
    # default mode on the same config: never overlaps
    torch.manual_seed(0)
    col = MultiBlockMaskCollator(32, 4, enc_mask_scale=(0.2, 0.8), pred_mask_scale=(0.2, 0.8),
                                 aspect_ratio=(0.3, 3.0), nenc=1, npred=2, min_keep=4)
    for _ in range(30):
        enc, pred = col.sample_boolean_masks(8)
        assert not bool((enc[:, :, None] & pred[:, None]).any())
        assert bool((enc.flatten(2).sum(-1) >= 4).all())


def test_default_mode_matches_official_law_when_official_never_falls_back():
    """Paper config on 14x14 (no fallbacks): same context-size distribution with the reference placement."""
    def context_counts(mode):
        torch.manual_seed(1)
        col = _collator(14, mode=mode, exclusive_corner=True)
        return torch.stack([col.sample_boolean_masks(8)[0].flatten(1).sum(-1).double() for _ in range(100)])
    a, b = context_counts("official"), context_counts("default")  # [batches, B]
    se = math.hypot(a.mean(1).std() / 10, b.mean(1).std() / 10)  # per-batch clustered stderr
    assert abs(float(a.mean() - b.mean())) <= 4 * se


def test_too_small_grid_and_bad_mode_raise():
    with pytest.raises(ValueError):
        MultiBlockMaskCollator(8, 4)  # 2x2 grid: a 1x1 context block cannot coexist with 4 targets
    with pytest.raises(ValueError):
        MultiBlockMaskCollator(224, 16, mode="fast")


def test_min_keep_capped_with_warning_on_tiny_grid():
    col = _collator(4)  # context block 3x3 = 9 patches < min_keep + npred
    with pytest.warns(UserWarning, match="min_keep=10 is not achievable"):
        enc, _ = col.sample_boolean_masks(4)
    assert bool((enc.flatten(1).sum(-1) >= 5).all())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_step_counter_shared_across_dataloader_workers():
    col = _collator(14)
    expected = set()
    for step in range(4):  # target length of batch i is the area of the size drawn with seed i
        g = torch.Generator()
        g.manual_seed(step)
        h, w = col.sample_block_size(g, col.pred_mask_scale, col.aspect_ratio)
        expected.add(h * w)
    loader = DataLoader(torch.zeros(16, 1), batch_size=4, num_workers=2, collate_fn=col,
                        multiprocessing_context="fork")
    lengths = {masks_pred[0].shape[1] for _, _, masks_pred in loader}
    assert col.current_step == 3  # the workers advanced the parent's shared counter
    assert lengths == expected
