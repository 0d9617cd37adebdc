"""Tests of pgd_deploy.engine's loss weighting: one weight per term, applied in one place."""

from __future__ import annotations

import torch

from pgd_deploy.engine import combine_weights, weighted_sum


def test_weighted_sum_multiplies_each_term_by_its_own_weight() -> None:
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(10.0), "c": torch.tensor(100.0)}
    assert weighted_sum(losses, {"a": 2.0, "b": 3.0}).item() == 2.0 + 30.0 + 100.0  # c: 1.0
    assert weighted_sum(losses, {}).item() == 111.0
    assert weighted_sum(losses, {"unused": 5.0, "c": 0.0}).item() == 11.0


def test_combine_weights_multiplies_per_name() -> None:
    provider = {"kd_cls_fg_p3": 0.04, "kd_reg_feat_p3": 0.064}
    train = {"kd_cls_fg_p3": 2.0, "loss_box": 3.0}
    assert combine_weights(provider, train) == {
        "kd_cls_fg_p3": 0.08,
        "kd_reg_feat_p3": 0.064,
        "loss_box": 3.0,
    }
    assert combine_weights() == {} and combine_weights(train) == train
    assert combine_weights(train) is not train
