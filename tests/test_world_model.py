"""World-model MRR: the pure ranking function, and IWM's protocol end to end on a tiny model."""
from __future__ import annotations

import pytest
import torch

from visrep.config import load_config
from visrep.eval.world_model import reciprocal_ranks
from visrep.methods import DataInfo, build_method


def test_reciprocal_ranks_perfect_and_ignorant_predictors():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3, 5, 4, 2, generator=g)
    assert torch.equal(reciprocal_ranks(bank.clone(), bank), torch.ones(3, 5))   # predicts what it is asked
    same = bank[:, :1].expand(-1, 5, -1, -1)                                        # always predicts version 0
    rr = reciprocal_ranks(same, bank)
    assert torch.all(rr[:, 0] == 1.0) and torch.all(rr[:, 1:] < 1.0)
    tie = torch.zeros(1, 4, 1, 1)                                                   # all versions identical
    assert torch.allclose(reciprocal_ranks(tie, tie), torch.full((1, 4), 0.25))   # ties count against
    with pytest.raises(ValueError, match=r"\[B, N, T, D\]"):
        reciprocal_ranks(bank, bank[:, :2])


def test_iwm_world_model_mrr_runs_and_is_a_rank():
    cfg = load_config(None, ["method.name=iwm", "data.image_size=16", "model.patch_size=4", "model.embed_dim=32",
                             "model.depth=1", "model.num_heads=2", "method.pred_emb_dim=16", "method.pred_depth=1",
                             "method.num_pred_masks=2", "method.min_keep=2", "method.pred_mask_scale=0.1,0.2"])
    torch.manual_seed(0)
    m = build_method(cfg, DataInfo(in_chans=3, image_size=16, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3))
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    a = m.world_model_mrr(images, n_candidates=4, generator=torch.Generator().manual_seed(1))
    b = m.world_model_mrr(images, n_candidates=4, generator=torch.Generator().manual_seed(1))
    assert a == b and 0.25 <= a <= 1.0 and m.training  # deterministic, a rank, training mode restored
