"""Range checks of every numeric config key and flag (config.bounds): each field declares its
range beside its default, checked whenever a section is built; the refusal names the key (or the
flag), the value and the range, and where the value was set."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from pgd_deploy.config import ExportJob, ServeConfig, TrainJob, load_config
from pgd_deploy.config.bounds import FINITE, Bound, check_section

ROOTS = {"train": TrainJob, "export": ExportJob, "serve": ServeConfig}


def _sections():
    """(root name, key prefix, section class) of every config section, serve's root included."""
    for name, root in ROOTS.items():
        if root is ServeConfig:
            yield name, "", root
            continue
        for f in dataclasses.fields(root):
            yield name, f"{f.name}.", f.default_factory


def _numeric(tp) -> bool:
    """An annotation that holds numbers: int, float, optional ones, tuples and dicts of them."""
    for arg in typing.get_args(tp) or (tp,):
        inner = typing.get_args(arg)
        if arg in (int, float) or (typing.get_origin(arg) in (tuple, dict) and float in inner):
            return True
        if typing.get_origin(arg) is tuple and int in inner:
            return True
    return False


def _fields():
    """(root, key, field, annotation) of every numeric field of every section."""
    for root, prefix, section in _sections():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if _numeric(hints[f.name]):
                yield root, f"{prefix}{f.name}", f, hints[f.name]


FIELDS = list(_fields())


def test_every_numeric_key_declares_its_range_beside_its_default():
    assert len(FIELDS) > 80
    missing = [key for _, key, f, _ in FIELDS if f.metadata.get("bound") in (None, FINITE)]
    assert not missing, f"numeric keys without a declared range: {missing}"


def _bad_values(f: dataclasses.Field, tp) -> list[str]:
    """TOML literals the field's declared range refuses: NaN and infinities for a float, and
    -1, 0 and one past the top where the range excludes them; in a list or a table for a key
    that holds several numbers."""
    bound: Bound = f.metadata["bound"]
    is_float = "float" in str(tp)
    bad = ["nan", "inf", "-inf"] if is_float else []
    candidates = [-1, 0] + ([bound.high + 1] if bound.high is not None else [])
    candidates += [max(bound.values) + 1] if bound.values else []
    bad += [str(v) for v in candidates if not bound.contains(v)]
    if "tuple" in str(tp):
        return [f"[{v}]" for v in bad]
    if "dict" in str(tp):
        return [f"{{loss_box = {v}}}" for v in bad]
    return bad


CASES = [
    pytest.param(root, key, value, id=f"{key}={value}")
    for root, key, f, tp in FIELDS
    for value in _bad_values(f, tp)
]


@pytest.mark.parametrize("root,key,value", CASES)
def test_every_numeric_key_refuses_nan_infinities_and_values_out_of_range(root, key, value):
    with pytest.raises(ValueError) as err:
        load_config(ROOTS[root], None, [f"{key}={value}"])
    message = str(err.value)
    assert message.startswith("--set: ") and f"'{key}" in message, message


BAD_VALUES = [  # the ranges that matter, spelled out (the walk above takes them from the schema)
    ("train", "train.max_iters=-5", "train.max_iters", ">= 0, got -5"),  # fell back to epochs
    ("train", "train.epochs=0", "train.epochs", ">= 1 when train.max_iters is 0"),
    ("train", "train.base_lr=0", "train.base_lr", "> 0"),
    ("train", "train.lr_steps=[11, 8]", "train.lr_steps", "must increase"),
    ("train", "train.momentum=1.0", "train.momentum", "in [0, 1)"),
    ("train", "model.depth=7", "model.depth", "one of 18, 34, 50, 101, 152"),
    ("train", "model.nms_thresh=0", "model.nms_thresh", "in (0, 1]"),
    ("train", "model.fpn_channels=48", "model.fpn_channels", "multiple of 32"),
    ("train", "model.regress_ranges=[64, 32, 256, 512]", "model.regress_ranges", "increasing"),
    ("train", "data.max_size=100", "data.max_size", ">= data.min_size"),
    ("train", "data.multiscale=[800]", "data.multiscale", "[lo, hi]"),
    ("export", "gates.agreement_min_fp32=nan", "gates.agreement_min_fp32", "in [0, 1], got nan"),
    ("export", "export.imgsz=[100, 128]", "export.imgsz", "multiple of 32"),
    ("export", "export.batch_max=4", "export.batch_max", "batch_opt <= batch_max, got 1, 8, 4"),
    ("serve", "max_det=-1", "max_det", ">= 1, got -1"),  # dropped the last detection
]


@pytest.mark.parametrize("root,override,key,expected", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_refusals_name_the_key_the_value_and_the_range(root, override, key, expected):
    with pytest.raises(ValueError) as err:
        load_config(ROOTS[root], None, [override])
    message = str(err.value)
    assert f"--set: config key '{key}'" in message and expected in message, message


def test_a_range_across_keys_holds_for_the_whole_config_not_each_source(tmp_path):
    recipe = tmp_path / "short.toml"
    recipe.write_text("[train]\nmax_iters = 50\n")
    assert load_config(TrainJob, recipe, ["train.epochs=0"]).train.epochs == 0  # max_iters sets it
    assert load_config(ExportJob, None, ["export.batch_opt=2", "export.batch_max=4"])


def test_a_recipe_value_out_of_range_names_the_recipe(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nmax_iters = -5\n")
    with pytest.raises(ValueError, match=r"bad\.toml: config key 'train\.max_iters': .*got -5"):
        load_config(TrainJob, recipe)
    with pytest.raises(ValueError, match=r"^--set: config key 'train\.max_iters'"):
        load_config(TrainJob, recipe, ["train.max_iters=-1"])


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"'batch': must be >= 1, got 0"):
        ServeConfig(batch=0)
    with pytest.raises(ValueError, match=r"'score_thresh': must be in \[0, 1\], got nan"):
        ServeConfig(score_thresh=math.nan)
    assert ServeConfig(score_thresh=None).score_thresh is None  # unset stays valid
    for _, _, section in _sections():
        section()  # every default inside its own range


def test_a_key_without_a_range_must_still_be_finite():
    @dataclasses.dataclass(frozen=True)
    class Section:
        a: float = 1.0

    check_section(Section(), "s")
    with pytest.raises(ValueError, match=r"'s\.a': must be a finite number, got inf"):
        check_section(Section(a=math.inf), "s")
    assert Bound(low=0, high=1, high_open=True).describe() == "in [0, 1)"
    assert Bound(low=0, low_open=True).describe() == "> 0"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["predict", "--model", "m.onnx", "--source", ".", "--max-det", "-1"],
            "--max-det: must be >= 1, got -1",
        ),
        (
            ["predict", "--model", "m.onnx", "--source", ".", "--score-thresh", "nan"],
            "--score-thresh: must be in [0, 1], got nan",
        ),
        (
            ["predict", "--model", "m.onnx", "--source", ".", "--gpus-per-actor", "nan"],
            "--gpus-per-actor: must be >= 0, got nan",
        ),
        (
            ["demo", "--teacher", "t.pt", "--student", "s.pt", "--port", "70000"],
            "--port: must be in [0, 65535], got 70000",
        ),
    ],
)
def test_serve_flags_out_of_range_stop_before_any_work(argv, expected, capsys):
    from pgd_deploy.serve.command import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"argument {expected}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch-opt", "0"], "argument --batch-opt: must be >= 1, got 0"),
        (["--conf", "inf"], "argument --conf: must be in [0, 1], got inf"),
        (["--opset", "9"], "argument --opset: must be in [13, 23], got 9"),
    ],
)
def test_export_flags_out_of_range_stop_before_any_work(argv, expected, capsys, tmp_path):
    from pgd_deploy.export.command import main

    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "x.pt"), *argv])
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_flag_across_keys_is_named_by_its_flag(tmp_path, capsys):
    from pgd_deploy.export.command import main

    code = main(["--checkpoint", str(tmp_path / "x.pt"), "--batch-min", "4", "--batch-opt", "2"])
    assert code == 2
    assert "--batch-opt: config key 'export.batch_opt'" in capsys.readouterr().err
