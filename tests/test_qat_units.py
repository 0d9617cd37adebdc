"""Fast unit tests of `pgd_deploy.qat` (the mutation-testing selection of the module, with
`test_qat_export_units.py`): a tiny Conv/BatchNorm/ReLU network (`tiny_detector`) under real
modelopt fake quantization, no training. `test_qat.py` runs the whole QAT pipeline end to end."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

pytest.importorskip("modelopt.torch.quantization")

from pgd_deploy import qat  # noqa: E402
from pgd_deploy.config import TrainJob  # noqa: E402
from pgd_deploy.config.schema import DataConfig, DistillConfig, QatConfig, TrainConfig  # noqa: E402
from pgd_deploy.data.dataset import Failure  # noqa: E402
from pgd_deploy.export.images import MIN_CALIB_IMAGES  # noqa: E402

QUANTIZED = ("conv1", "conv2", "downsample.0", "head.tower.0")  # every conv but the predictors


class TinyHead(nn.Module):
    float_predictors = ("cls_logits", "bbox_pred")

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls_logits = nn.Conv2d(8, 2, 1)
        self.bbox_pred = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tower(x)
        return torch.cat([self.cls_logits(x), self.bbox_pred(x)], dim=1)


class TinyDetector(nn.Module):
    """ResNet naming (convK/bnK, a downsample Sequential) and a head with float predictors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.head = TinyHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + self.downsample(x))
        return self.head(x)


def tiny_detector(seed: int = 0) -> TinyDetector:
    """A `TinyDetector` in eval mode with non-trivial BatchNorm statistics and affine terms."""
    torch.manual_seed(seed)
    model = TinyDetector()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
    return model.eval()


def calib_batches() -> list[torch.Tensor]:
    """Two calibration batches; the second holds the largest input value."""
    torch.manual_seed(1)
    return [torch.randn(2, 3, 16, 16), 2 * torch.randn(1, 3, 16, 16)]


@pytest.fixture(scope="module")
def quantized() -> dict:
    """{"float": the tiny detector, "folded": it with BatchNorm folded, "qat": its fake-quant
    copy calibrated on `calib_batches`}."""
    model = tiny_detector()
    folded = copy.deepcopy(model)
    qat.fold_batchnorm(folded)
    fake = qat.insert_fake_quant(copy.deepcopy(model), calib_batches())
    return {"float": model, "folded": folded, "qat": fake}


def _observed_ranges(folded: nn.Module) -> dict[str, dict]:
    """The placement a max calibration must give, measured on the folded float model."""
    seen: dict[str, dict] = {name: {"input": 0.0, "output": 0.0} for name in QUANTIZED}

    def hook(name):
        def record(module, inputs, output):
            seen[name]["input"] = max(seen[name]["input"], inputs[0].abs().max().item())
            seen[name]["output"] = max(seen[name]["output"], output.abs().max().item())

        return record

    handles = [folded.get_submodule(n).register_forward_hook(hook(n)) for n in QUANTIZED]
    with torch.no_grad():
        for images in calib_batches():
            folded(images)
    for handle in handles:
        handle.remove()
    for name in QUANTIZED:
        weight = folded.get_submodule(name).weight.detach()
        seen[name]["weight"] = weight.abs().amax(dim=(1, 2, 3)).tolist()
    return seen


def test_quant_config_quantizes_conv_weights_per_channel_and_activations_per_tensor_in_int8():
    def conv(kind: str, axis: int | None) -> dict:
        cfg = {"num_bits": 8, "axis": axis}
        return {"quantizer_name": f"*{kind}_quantizer", "parent_class": "nn.Conv2d", "cfg": cfg}

    rules = [{"quantizer_name": "*", "enable": False}, conv("input", None), conv("weight", 0)]
    rules.append(conv("output", None))
    assert qat.quant_config() == {"quant_cfg": rules, "algorithm": "max"}
    assert qat.quant_config(("head.cls_logits", "head.bbox_pred"))["quant_cfg"] == [
        *rules,
        {"quantizer_name": "head.cls_logits.*", "enable": False},
        {"quantizer_name": "head.bbox_pred.*", "enable": False},
    ]


def test_inserted_weight_quantizers_keep_one_amax_per_output_channel(quantized):
    for name in QUANTIZED:
        conv = quantized["qat"].get_submodule(name)
        weight, act_in, act_out = conv.weight_quantizer, conv.input_quantizer, conv.output_quantizer
        assert (weight.num_bits, weight.axis) == (8, 0), name
        assert weight.amax.numel() == conv.out_channels > 1, name
        expected = conv.weight.detach().abs().amax(dim=(1, 2, 3))
        assert torch.equal(weight.amax.reshape(-1), expected), name
        for act in (act_in, act_out):
            assert (act.num_bits, act.axis, act.amax.numel()) == (8, None, 1), name


def test_placement_is_the_max_calibrated_range_of_every_quantized_conv(quantized):
    placement = qat.placement(quantized["qat"])
    assert list(placement) == list(QUANTIZED)  # the predictors keep no quantizer
    assert placement == _observed_ranges(quantized["folded"])
    first = calib_batches()[1].abs().max().item()  # conv1 reads the images: the second batch
    assert placement["conv1"]["input"] == first
    for name in ("head.cls_logits", "head.bbox_pred"):
        conv = quantized["qat"].get_submodule(name)
        assert not any(getattr(conv, f"{k}_quantizer").is_enabled for k in qat.QUANTIZERS)


def test_placement_reports_a_disabled_quantizer_as_none(quantized):
    model = copy.deepcopy(quantized["qat"])
    model.conv2.output_quantizer.disable()
    model.conv1.weight_quantizer.disable()
    placement = qat.placement(model)
    assert placement["conv2"]["output"] is None and placement["conv1"]["weight"] is None
    assert isinstance(placement["conv2"]["input"], float) and len(placement["conv2"]["weight"]) == 8
    for kind in qat.QUANTIZERS:
        getattr(model.conv1, f"{kind}_quantizer").disable()
    assert "conv1" not in qat.placement(model)


def test_fake_quant_model_quantizes_its_outputs_onto_the_int8_grid(quantized):
    model = quantized["qat"]
    step = model.conv1.output_quantizer.amax.item() / qat.INT8_MAX
    with torch.no_grad():
        out = model.conv1(calib_batches()[0])
    levels = out / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= qat.INT8_MAX + 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_insert_fake_quant_keeps_the_training_mode(training):
    model = tiny_detector().train(training)
    qat.insert_fake_quant(model, calib_batches()[:1])
    assert model.training is training and model.head.tower.training is training


def test_insert_fake_quant_logs_what_it_calibrated_and_keeps_modelopt_off_stdout(caplog, capsys):
    with caplog.at_level(logging.DEBUG, logger="pgd_deploy.qat"):
        qat.insert_fake_quant(tiny_detector(), calib_batches())
    assert caplog.messages[-1] == "qat: 4 quantized convolutions calibrated on 3 images"
    assert caplog.messages[0].startswith("modelopt: ") and not capsys.readouterr().out


def test_insert_fake_quant_without_a_calibration_batch_is_refused():
    with pytest.raises(ValueError, match="^qat: no calibration batch was given$"):
        qat.insert_fake_quant(tiny_detector(), [])


def test_is_quantized_only_with_fake_quantizers(quantized):
    assert qat.is_quantized(quantized["qat"])
    assert not qat.is_quantized(quantized["float"]) and not qat.is_quantized(quantized["folded"])


def test_fold_batchnorm_folds_every_norm_exactly_and_counts_them():
    model = tiny_detector()
    images = calib_batches()[0]
    with torch.no_grad():
        expected = model(images)
    assert qat.fold_batchnorm(model) == 4
    identities = [n for n, m in model.named_modules() if isinstance(m, nn.Identity)]
    assert identities == ["bn1", "bn2", "downsample.1", "head.tower.1"]
    with torch.no_grad():
        assert (model(images) - expected).abs().max() <= 1e-5
    assert model.conv1.bias.requires_grad and model.conv1.weight.requires_grad
    assert qat.fold_batchnorm(model) == 0  # nothing left to fold


def test_fold_batchnorm_folds_frozen_norms_and_keeps_frozen_weights_frozen():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))
    block[1].running_mean.uniform_(-1, 1)
    block[1].running_var.uniform_(0.5, 2.0)
    block[1].weight.uniform_(0.5, 1.5)
    block[1].bias.uniform_(-0.5, 0.5)
    block[0].weight.requires_grad_(False)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = block(images)
    assert qat.fold_batchnorm(block) == 1
    assert isinstance(block[1], nn.Identity) and not block[0].bias.requires_grad
    with torch.no_grad():
        assert (block(images) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("layers", "where"),
    [
        ({"block": nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))}, "block.1"),
        ({"conv": nn.Conv2d(3, 4, 1), "bn1": nn.BatchNorm2d(4)}, ".bn1"),
        ({"conv1": nn.ReLU(), "bn1": nn.BatchNorm2d(4)}, ".bn1"),
    ],
)
def test_fold_batchnorm_refuses_a_norm_without_its_convolution(layers, where):
    parent = nn.Module()
    for name, layer in layers.items():
        parent.add_module(name, layer)
    with pytest.raises(ValueError, match=f"^{re.escape(where)}: no convolution to fold this norm"):
        qat.fold_batchnorm(parent)


def test_float_predictors_name_the_heads_prediction_convs():
    from pgd_deploy.models.fcos import FCOSHead

    assert qat.float_predictors(tiny_detector()) == ("head.cls_logits", "head.bbox_pred")
    detector = nn.Module()
    detector.head = FCOSHead(num_classes=2, channels=32, num_convs=1)
    names = qat.float_predictors(detector)
    assert names == ("head.cls_logits", "head.bbox_pred", "head.centerness")
    assert all(isinstance(detector.get_submodule(n), nn.Conv2d) for n in names)


def test_checkpoint_entry_restores_the_same_fake_quantization_bit_exactly(quantized, tmp_path):
    entry = qat.checkpoint_entry(quantized["qat"], tmp_path / "student.pt")
    assert {k: v for k, v in entry.items() if k != "modelopt_state"} == {
        "version": 1,
        "init": str(tmp_path / "student.pt"),
        "batchnorm_folded": True,
    }
    torch.save({"qat": entry, "model": quantized["qat"].state_dict()}, tmp_path / "qat.pt")
    saved = torch.load(tmp_path / "qat.pt", weights_only=True)  # plain data only
    model = tiny_detector(seed=3)  # other weights: everything must come from the checkpoint
    qat.restore_fake_quant(model, saved["qat"])
    assert qat.is_quantized(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.load_state_dict(saved["model"])
    assert qat.placement(model) == qat.placement(quantized["qat"])
    images = calib_batches()[0]
    with torch.no_grad():
        assert torch.equal(model(images), quantized["qat"](images))


def test_restore_folds_batchnorm_only_when_the_entry_says_so():
    mtq, _ = qat.require_modelopt()
    unfolded = tiny_detector()
    with qat._quiet_modelopt():
        mtq.quantize(unfolded, qat.quant_config(), lambda m: m(calib_batches()[0]))
    entry = {**qat.checkpoint_entry(unfolded, "s.pt"), "batchnorm_folded": False}
    model = tiny_detector()
    qat.restore_fake_quant(model, entry)
    assert isinstance(model.bn1, nn.BatchNorm2d) and qat.is_quantized(model)


@pytest.mark.parametrize("change", [{"version": 2}, {"version": None}, {"modelopt_state": None}])
def test_restore_fake_quant_refuses_an_unknown_entry_naming_its_source(quantized, change):
    entry = {**qat.checkpoint_entry(quantized["qat"], "s.pt"), **change}
    entry = {k: v for k, v in entry.items() if v is not None}
    message = (
        r"^runs/last\.pt: unknown 'qat' entry \(expected version 1 with a modelopt_state\); "
        "re-run the QAT fine-tune with this version$"
    )
    with pytest.raises(ValueError, match=message):
        qat.restore_fake_quant(tiny_detector(), entry, source="runs/last.pt")
    with pytest.raises(ValueError, match="^checkpoint: unknown 'qat' entry"):
        qat.restore_fake_quant(tiny_detector(), entry)


class Images:
    """A dataset of `count` images, `unreadable` of them Failures; records which it decoded."""

    def __init__(self, count: int, unreadable=()) -> None:
        self.items = [
            Failure(i, f"{i}.jpg", "truncated") if i in unreadable else i for i in range(count)
        ]
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.items[index]


def calib_cfg(calib_images: int, root: str = "data/coco") -> TrainJob:
    return TrainJob(
        data=DataConfig(root=root, train_images="train"), qat=QatConfig(calib_images=calib_images)
    )


def test_calibration_takes_the_first_readable_images_decoding_each_once(caplog):
    images = Images(20, unreadable={1, 3})
    with caplog.at_level(logging.WARNING, logger="pgd_deploy.qat"):
        assert qat.calibration_indices(calib_cfg(8), images) == [0, 2, 4, 5, 6, 7, 8, 9]
    assert images.read == list(range(10))
    assert [r.getMessage() for r in caplog.records] == [
        "qat calibration: skipped 2 unreadable training image(s) in data/coco/train, "
        "e.g. 1.jpg: truncated; 3.jpg: truncated"
    ]
    caplog.clear()
    readable = Images(20)
    assert qat.calibration_indices(calib_cfg(8), readable) == list(range(8)) == readable.read
    assert qat.calibration_indices(calib_cfg(64), Images(18)) == list(range(18))
    assert not caplog.records


def test_calibration_needs_min_calib_images_readable_ones():
    assert MIN_CALIB_IMAGES == 16
    enough = Images(20, unreadable={0, 1, 2, 3})
    assert qat.calibration_indices(calib_cfg(64), enough) == list(range(4, 20))
    with pytest.raises(ValueError) as err:
        qat.calibration_indices(calib_cfg(64), Images(20, unreadable={0, 1, 2, 3, 4}))
    assert str(err.value) == (
        "qat calibration (data/coco/train, data.train_images): only 15 readable training "
        "image(s) of 20, 16 needed (qat.calib_images = 64); 5 unreadable, "
        "e.g. 0.jpg: truncated; 1.jpg: truncated; 2.jpg: truncated"
    )


def test_calibration_of_fewer_images_than_the_minimum_needs_all_of_them():
    with pytest.raises(ValueError, match=r"only 3 readable training image\(s\) of 4, 4 needed"):
        qat.calibration_indices(calib_cfg(4), Images(4, unreadable={2}))
    with pytest.raises(ValueError) as err:
        qat.calibration_indices(calib_cfg(8, root=""), Images(3))
    assert str(err.value) == (
        "qat calibration (synthetic shapes, data.train_images): only 3 readable training "
        "image(s) of 3, 8 needed (qat.calib_images = 8); 0 unreadable"
    )


def test_calibration_batches_are_the_first_images_in_training_batches(shapes_root):
    from pgd_deploy.data.dataset import build_dataset

    data = DataConfig(
        root=str(shapes_root),
        train_images="train",
        train_ann="annotations/train.json",
        min_size=64,
        max_size=64,
        workers=0,
    )
    cfg = TrainJob(data=data, train=TrainConfig(batch_size=2), qat=QatConfig(calib_images=5))
    batches = list(qat.calibration_batches(cfg, torch.device("cpu")))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    dataset = build_dataset(data, "train", train=False)
    expected = torch.stack([torch.from_numpy(dataset[i].image) for i in range(5)])
    assert torch.equal(torch.cat(batches), expected)


def test_a_resumed_qat_student_is_rebuilt_from_the_checkpoint_entry(quantized):
    cfg = TrainJob(qat=QatConfig(init="/moved/away/student.pt"))  # not read on resume
    entry = qat.checkpoint_entry(quantized["qat"], "/moved/away/student.pt")
    model = tiny_detector()
    qat.prepare_student(model, cfg, torch.device("cpu"), resume=entry)
    assert qat.is_quantized(model) and isinstance(model.bn1, nn.Identity)
    match = "^the checkpoint resumed from: unknown 'qat' entry"
    with pytest.raises(ValueError, match=match):
        qat.prepare_student(tiny_detector(), cfg, torch.device("cpu"), resume={"version": 0})


def test_qat_student_refuses_the_teachers_initialisation():
    distill = DistillConfig(teacher="teacher.pt", init_student=True)
    cfg = TrainJob(distill=distill, qat=QatConfig(init="student.pt"))
    model = tiny_detector()
    with pytest.raises(ValueError, match="set distill.init_student=false$"):
        qat.prepare_student(model, cfg, torch.device("cpu"))
    assert not qat.is_quantized(model)
