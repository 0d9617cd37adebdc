"""Only the batch axis is dynamic: N (locations) and C (classes) are fixed numbers in the exported
graph, its manifest and hence the Triton config (the dense export used to leave `scores` with
symbolic dims `Castscores_dim_1/2`, recorded as -1 and written to config.pbtxt as wildcards)."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")

from _export_fixtures import make_checkpoint  # noqa: E402

from pgd_deploy.export.to_onnx import export_onnx, fix_output_dims  # noqa: E402

IMGSZ = (64, 96)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pgd_deploy.export.deploy_model import probe_level_sizes
    from pgd_deploy.export.source import load_source

    src = load_source(make_checkpoint(tmp_path_factory.mktemp("dims") / "m.pt"))
    n = sum(probe_level_sizes(src.detector, IMGSZ))
    return export_onnx(src.detector, imgsz=IMGSZ, simplify=False), n


def _dims(value):
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in value.type.tensor_type.shape.dim
    ]


def test_outputs_have_fixed_locations_and_classes(exported):
    model, n = exported
    assert {o.name: _dims(o) for o in model.graph.output} == {
        "boxes": ["batch", n, 4],
        "scores": ["batch", n, 3],
    }


def test_manifest_records_them_with_axis_names(exported):
    from pgd_deploy.export.manifest import describe_io

    model, n = exported
    inputs, outputs = describe_io(model)
    assert inputs[0]["shape"] == [-1, 3, *IMGSZ]
    assert outputs[1] == {
        "name": "scores",
        "dtype": "float32",
        "shape": [-1, n, 3],
        "axes": ["batch", "locations", "classes"],
    }


@pytest.mark.parametrize("wrong", [{"num_locations": 7}, {"num_classes": 80}])
def test_dims_the_graph_does_not_compute_are_refused(exported, wrong):
    model, n = exported
    kwargs = {"num_locations": n, "num_classes": 3, **wrong}
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    with pytest.raises(ValueError, match="the exported graph does not produce"):
        fix_output_dims(bad, **kwargs)
