"""bench/int8_agreement.py: its miss breakdown, its output distillation and its calibrations do
what the export README's table says they do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _bench_scripts import load_bench

from pgd_deploy.structures import Detections


def test_misses_are_counted_in_the_band_of_their_fp32_score() -> None:
    bench = load_bench("int8_agreement")
    box = [10.0, 10.0, 50.0, 50.0]
    ref = Detections(
        [box, [60, 60, 90, 90], [0, 60, 20, 90], [100, 100, 140, 140]],
        [0.5, 0.3, 0.15, 0.07],
        [0, 1, 2, 0],
    )
    cand = Detections(
        [
            box,  # the 0.5 detection, reproduced
            [60, 60, 90, 90],  # right box, wrong class: the 0.3 detection is missed, nothing near
            [0, 60, 20, 80],  # IoU 2/3 with the 0.15 detection: missed, with a box near
            [100, 100, 140, 140],  # reproduced, but scored under the threshold: missed
        ],
        [0.5, 0.3, 0.15, 0.04],
        [0, 2, 2, 0],
    )

    def rows(iou: float) -> dict[str, tuple[int, int, int]]:
        return {
            band: (n, missed, near)
            for band, n, missed, near in bench._unmatched_by_score([ref], [cand], iou)
        }

    assert rows(0.9) == {
        "[0.05, 0.1)": (1, 1, 0),
        "[0.1, 0.2)": (1, 1, 1),
        "[0.2, 0.4)": (1, 1, 0),
        "[0.4, 1)": (1, 0, 0),
    }
    assert rows(0.5)["[0.1, 0.2)"] == (1, 0, 0)  # IoU 2/3 reproduces it at int8's IoU


class _Inner:
    """The PGD distiller's interface as the trainer sees it: named terms and their weights."""

    loss_weights = {"kd_cls_fg_p3": 0.04}

    def __call__(self, images, outputs, targets):
        return {"kd_cls_fg_p3": outputs.cls_logits[0].sum() * 0}

    def state_dict(self):
        return {"generator": 1}


@pytest.fixture(scope="module")
def tiny():
    from pgd_deploy.config import ModelConfig
    from pgd_deploy.models import build_detector

    torch.manual_seed(0)
    model = build_detector(ModelConfig(depth=18, fpn_channels=32, head_convs=1), num_classes=3)
    with torch.no_grad():  # scores near 0.5 instead of the prior's 0.01: every location counts
        model.head.cls_logits.bias.zero_()
    return model.eval()


def test_output_distillation_is_zero_at_the_fp32_outputs_and_grows_away_from_them(tiny) -> None:
    bench = load_bench("int8_agreement")
    images = torch.rand(2, 3, 64, 64)
    provider = bench.OutputDistillation(tiny, _Inner(), weight=1.0, keep_inner=True)
    with torch.no_grad():
        same = provider(images, tiny(images), [])
        moved = tiny(images)
        moved.box_regression[0].add_(0.5)
        moved.quality[0].add_(1.0)  # centerness
        moved.cls_logits[0].add_(1.0)
        away = provider(images, moved, [])
    assert set(same) == {"kd_cls_fg_p3", "out_cls", "out_box", "out_ctr"}
    assert float(same["out_box"]) == 0.0
    for name in ("out_cls", "out_box", "out_ctr"):
        # BCE against soft targets bottoms out at their entropy, reached at the fp32 outputs
        assert float(away[name]) > float(same[name]) + 1e-4, name
    assert provider.state_dict() == {"generator": 1}  # the distiller's state is checkpointed


@pytest.mark.parametrize("keep_inner", [True, False])
def test_output_distillation_alone_weighs_the_other_terms_zero(tiny, keep_inner) -> None:
    bench = load_bench("int8_agreement")
    weights = bench.OutputDistillation(
        tiny, _Inner(), weight=2.0, keep_inner=keep_inner
    ).loss_weights
    assert {weights[k] for k in ("out_cls", "out_box", "out_ctr")} == {2.0}
    others = {k: weights.get(k, 1.0) for k in ("kd_cls_fg_p3", "loss_cls", "loss_box", "loss_ctr")}
    expected = {"kd_cls_fg_p3": 0.04, "loss_cls": 1.0, "loss_box": 1.0, "loss_ctr": 1.0}
    assert others == (expected if keep_inner else dict.fromkeys(expected, 0.0))


def test_calibrations_differ_only_where_the_row_says(tiny, tmp_path) -> None:
    pytest.importorskip("modelopt.torch.quantization")
    from pgd_deploy.config import TrainJob, load_config
    from pgd_deploy.qat import placement

    bench = load_bench("int8_agreement")
    cfg = load_config(
        TrainJob,
        bench.RECIPE,
        [
            f"qat.init='{tmp_path / 'unused.pt'}'",
            f"data.cache_dir='{tmp_path}'",
            "data.shapes_train=16",
            "data.shapes_val=4",
            "data.shapes_size=64",
        ],
    )
    kw = {"images": 8}
    base = placement(bench._fake_quant(tiny, cfg, **kw))
    pct = placement(bench._fake_quant(tiny, cfg, act="percentile:99.0", **kw))
    no_out = bench._fake_quant(tiny, cfg, outputs=False, **kw)
    assert base.keys() == pct.keys() and base
    for name in base:
        assert pct[name]["weight"] == pytest.approx(base[name]["weight"])  # weights: max both
        assert pct[name]["input"] <= base[name]["input"] + 1e-6  # a percentile clips the max
    assert any(pct[n]["input"] < base[n]["input"] * 0.999 for n in base)
    assert all(v["output"] is None for v in placement(no_out).values())
    assert all(v["output"] is not None for v in base.values())
    assert np.isfinite([v["input"] for v in base.values()]).all()


def test_output_distillation_ignores_locations_the_fp32_student_scores_under_001(tiny) -> None:
    import copy

    bench = load_bench("int8_agreement")
    quiet = copy.deepcopy(tiny).eval()
    with torch.no_grad():
        quiet.head.cls_logits.bias.fill_(-10.0)  # every score ~ 5e-5: no location counts
        images = torch.rand(2, 3, 64, 64)
        moved = quiet(images)
        moved.box_regression[0].add_(0.5)
        moved.cls_logits[0].add_(3.0)
        terms = bench.OutputDistillation(quiet, _Inner(), weight=1.0, keep_inner=True)(
            images, moved, []
        )
    assert float(terms["out_box"]) == 0.0 and float(terms["out_cls"]) == 0.0
