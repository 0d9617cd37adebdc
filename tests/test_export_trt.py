"""TensorRT: what runs on any machine (profiles, version/GPU checks, build configuration and
runtime set-up against a recording stand-in of the `tensorrt` module, import guards) and, marked
`trt`, the real engine build and run where tensorrt and a GPU exist."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest

from pgd_deploy.export.to_tensorrt import BatchProfile, validate_profile
from pgd_deploy.runtime.trt_backend import EngineMismatchError, check_engine_compat, rebuild_hint

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_trt = pytest.mark.skipif(
    not (HAS_TRT and _gpu_available()),
    reason="needs tensorrt and a CUDA GPU (device buffers: pycuda, cuda-python or torch)",
)

MANIFEST = {
    "precision": "fp16",
    "imgsz": [800, 1344],
    "class_names": ["a", "b", "c"],
    "batch": {"min": 1, "opt": 8, "max": 16},
    "source": {"checkpoint": "runs/student/best.pt"},
    "tensorrt": {
        "version": "10.3.0.26",
        "compute_capability": "8.9",
        "gpu": "NVIDIA L4",
        "hardware_compatibility": "none",
        "version_compatible": False,
    },
}


def _with(**trt):
    return {**MANIFEST, "tensorrt": {**MANIFEST["tensorrt"], **trt}}


def test_profile_validation():
    assert validate_profile(1, 8, 16) == BatchProfile(1, 8, 16)
    assert BatchProfile(1, 2, 4).shapes((64, 96)) == (
        (1, 3, 64, 96),
        (2, 3, 64, 96),
        (4, 3, 64, 96),
    )
    with pytest.raises(ValueError, match=r"--batch-opt.*>= --batch-min \(4\)"):
        validate_profile(4, 2, 8)
    with pytest.raises(ValueError, match="--batch-max"):
        validate_profile(1, 8, 4)
    with pytest.raises(ValueError, match="--batch-min"):
        validate_profile(0, 1, 1)


def test_same_version_and_gpu_is_accepted():
    check_engine_compat(MANIFEST, trt_version="10.3.0.26", compute_capability=(8, 9))
    check_engine_compat(MANIFEST, trt_version="10.3.0", compute_capability="8.9")  # no build no.


@pytest.mark.parametrize("runtime", ["10.4.0.26", "10.3.1", "11.0.0", "10.2.0", "10.3.0.30"])
def test_other_tensorrt_version_is_refused_with_a_rebuild_command(runtime):
    """Another build of the same release too: TensorRT itself refuses such a plan."""
    with pytest.raises(EngineMismatchError) as err:
        check_engine_compat(MANIFEST, trt_version=runtime, compute_capability=(8, 9))
    message = str(err.value)
    assert "TensorRT 10.3.0.26" in message and runtime in message
    assert "rebuild with pgd-export --checkpoint runs/student/best.pt --format tensorrt" in message
    assert "--precision fp16 --imgsz 800x1344 --batch-min 1 --batch-opt 8 --batch-max 16" in message


def test_version_compatible_plan_accepts_the_same_or_any_later_runtime():
    """TensorRT docs ("Version Compatibility"): later runtimes, across majors (10 -> 11)."""
    manifest = _with(version_compatible=True)
    for runtime in ("10.3.0.26", "10.3.0.30", "10.7.0", "11.0.0", "11.4.0.1"):
        check_engine_compat(manifest, trt_version=runtime, compute_capability=(8, 9))
    for runtime in ("10.2.0", "10.3.0.25", "9.3.0"):
        with pytest.raises(EngineMismatchError, match="version-compatible plan"):
            check_engine_compat(manifest, trt_version=runtime, compute_capability=(8, 9))


@pytest.mark.parametrize("cc", [(8, 6), (9, 0), "7.5"])
def test_other_gpu_is_refused(cc):
    with pytest.raises(EngineMismatchError, match="compute capability 8.9 .*NVIDIA L4"):
        check_engine_compat(MANIFEST, trt_version="10.3.0.26", compute_capability=cc)


def test_ampere_plus_plan_runs_on_ampere_and_newer_only():
    manifest = _with(hardware_compatibility="ampere+")
    for cc in ((8, 0), (8, 6), (9, 0), (10, 0)):
        check_engine_compat(manifest, trt_version="10.3.0.26", compute_capability=cc)
    with pytest.raises(EngineMismatchError, match="ampere"):
        check_engine_compat(manifest, trt_version="10.3.0.26", compute_capability=(7, 5))


def test_manifest_without_tensorrt_entry_is_refused():
    with pytest.raises(ValueError, match="no 'tensorrt' entry"):
        check_engine_compat({"imgsz": [64, 64]}, trt_version="10.3.0", compute_capability=(8, 9))
    assert "--imgsz 64x64" in rebuild_hint({"imgsz": [64, 64]})


def test_plan_without_manifest_is_refused(tmp_path):
    from pgd_deploy.runtime.backends import load_backend

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00" * 16)
    with pytest.raises(FileNotFoundError, match="model.manifest.json"):
        load_backend(plan)


@pytest.mark.skipif(HAS_TRT, reason="only meaningful where tensorrt is not installed")
def test_missing_tensorrt_names_the_extra(tmp_path):
    from pgd_deploy.export.to_tensorrt import BatchProfile, build_engine
    from pgd_deploy.runtime.backends import load_backend

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00" * 16)
    (tmp_path / "model.manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(ImportError, match=r"pgd-deploy\[trt\]"):
        load_backend(plan)
    with pytest.raises(ImportError, match=r"pgd-deploy\[trt\]"):
        build_engine(
            tmp_path / "m.onnx",
            plan,
            input_name="images",
            imgsz=(64, 64),
            profile=BatchProfile(1, 1, 1),
            precision="fp32",
        )


def test_build_options_are_validated_before_tensorrt_is_needed(tmp_path):
    from pgd_deploy.export.to_tensorrt import build_engine

    kwargs = dict(
        input_name="images", imgsz=(64, 64), profile=BatchProfile(1, 1, 1), precision="fp32"
    )
    with pytest.raises(ValueError, match="--hw-compat"):
        build_engine("m.onnx", tmp_path / "p.plan", hw_compat="turing+", **kwargs)
    with pytest.raises(ValueError, match="--builder-opt-level"):
        build_engine("m.onnx", tmp_path / "p.plan", opt_level=9, **kwargs)


class _RecordingConfig:
    """A builder config that records the flags `_configure` sets on it."""

    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.cleared: set[str] = set()
        self.pools: dict[str, int] = {}

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared.add(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size


def _fake_trt(**extra):
    names = ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "TF32")
    return SimpleNamespace(
        BuilderFlag=SimpleNamespace(**{n: n for n in names}),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"),
        **extra,
    )


@pytest.mark.parametrize("compatible", [True, False])
def test_version_compatible_build_keeps_the_lean_runtime_in_the_plan(compatible):
    """EXCLUDE_LEAN_RUNTIME would make later TensorRT versions unable to load the plan (they
    could only run it through load_runtime with this build's lean library)."""
    from pgd_deploy.export.to_tensorrt import _configure

    config = _RecordingConfig()
    builder = SimpleNamespace(create_builder_config=lambda: config)
    _configure(
        _fake_trt(),
        builder,
        precision="fp32",
        workspace_gb=1.0,
        opt_level=3,
        hw_compat="ampere+",
        version_compatible=compatible,
    )
    assert ("VERSION_COMPATIBLE" in config.flags) == compatible
    assert "EXCLUDE_LEAN_RUNTIME" not in config.flags
    assert config.cleared == {"TF32"} and config.hardware_compatibility_level == "AMPERE_PLUS"


class _FakeBuffers:
    name = "fake"

    def compute_capability(self):
        return (8, 9)

    def device_name(self):
        return "NVIDIA L4"

    def active(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("compatible", [True, False])
def test_runner_trusts_the_host_code_of_a_version_compatible_plan(
    tmp_path, monkeypatch, compatible
):
    """The runner sets engine_host_code_allowed (TensorRT Python API, tensorrt.Runtime) before
    deserialising a version-compatible plan, and only then."""
    from pgd_deploy.runtime import cuda_buffers, trt_backend

    runtimes = []

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False
            runtimes.append(self)

        def deserialize_cuda_engine(self, plan):
            self.allowed_when_loading = self.engine_host_code_allowed
            return None  # stop here: the rest needs a GPU

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    fake = _fake_trt(__version__="10.3.0.26", Runtime=Runtime, Logger=Logger)
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(cuda_buffers, "open_buffers", lambda device=0: _FakeBuffers())
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    (tmp_path / "m.manifest.json").write_text(json.dumps(_with(version_compatible=compatible)))
    with pytest.raises(EngineMismatchError, match="could not deserialise"):
        trt_backend.TrtBackend(plan)
    assert runtimes[0].allowed_when_loading is compatible
    runtime = trt_backend.make_runtime(fake, None, _with(version_compatible=compatible))
    assert runtime.engine_host_code_allowed is compatible


@pytest.mark.parametrize(
    "candidates, cc, ok",
    [
        (3839, "8.9", True),
        (3839, "6.1", True),
        (2000, "6.2", True),
        (2001, "6.2", False),
        (2001, "5.3", False),
        (5001, "8.0", False),
        (0, "5.3", True),
    ],
)
def test_nms_candidates_within_the_gpu_nms_limit(candidates, cc, ok):
    """TensorRT's NMS layer: 5000 boxes per image, 2000 on SM 5.3 / 6.2 (operator docs)."""
    from pgd_deploy.export.to_tensorrt import check_nms_candidates

    if ok:
        check_nms_candidates(candidates, cc)
    else:
        with pytest.raises(ValueError, match=f"--nms-topk {candidates}.*compute capability {cc}"):
            check_nms_candidates(candidates, cc)


# ------------------------------------------------------------------------------------------
# With TensorRT and a GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_run_and_gates(tmp_path, precision):
    from _export_fixtures import make_checkpoint

    from pgd_deploy.export.command import main
    from pgd_deploy.runtime.backends import load_backend

    ckpt = make_checkpoint(tmp_path / "student.pt", cls_bias=-1.0, box_bias=1.0)
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--format",
            "tensorrt",
            "--precision",
            precision,
            "--imgsz",
            "128x128",
            "--batch-min",
            "1",
            "--batch-opt",
            "2",
            "--batch-max",
            "4",
            "--gate-images",
            "8",
            "--out",
            str(tmp_path),
            "--name",
            "s",
        ]
    )
    assert rc == 0
    plan = tmp_path / "s_trt.plan"
    assert plan.read_bytes()[:4] != b'{"me'  # raw plan, no JSON header
    backend = load_backend(plan)
    out = backend.infer(np.zeros((3, 3, 128, 128), np.float32))
    assert out["boxes"].shape[0] == 3 and out["boxes"].dtype == np.float32
    assert backend.infer(np.zeros((5, 3, 128, 128), np.float32))["boxes"].shape[0] == 5  # split


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_in_graph_nms_builds_in_tensorrt(tmp_path):
    from _export_fixtures import make_checkpoint

    from pgd_deploy.export.command import main

    ckpt = make_checkpoint(tmp_path / "student.pt", cls_bias=0.0, box_bias=1.5)
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--format",
            "tensorrt",
            "--nms",
            "onnx",
            "--imgsz",
            "128x128",
            "--batch-max",
            "2",
            "--batch-opt",
            "2",
            "--gate-images",
            "4",
            "--out",
            str(tmp_path),
            "--name",
            "n",
        ]
    )
    assert rc == 0
