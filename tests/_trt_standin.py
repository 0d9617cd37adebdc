"""Test-only stand-in for the TensorRT engine build and the TensorRT runner, on a CPU.

A plan keeps the input and outputs of the ONNX it was built from, so ONNX Runtime running that
ONNX is a faithful stand-in for the engine's *interface* (names, shapes, dtypes, batch profile)
and, at fp32, for its numbers. `install(monkeypatch)` replaces

- `pgd_deploy.export.to_tensorrt.build_engine` by a function that takes the same arguments (they
  are bound to the real signature, so a caller that drifts fails here too), writes the source ONNX
  bytes as the "plan" and returns the manifest's "tensorrt" entry from the real `_build_info`;
- `pgd_deploy.runtime.trt_backend.TrtBackend` by a subclass whose engine is an ONNX Runtime
  session on those bytes; everything else (the manifest requirement, batch splitting and padding
  to the profile, the I/O contract check) is the real runner's code.

This lives in the tests only: the product has no flag that fakes TensorRT.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

STANDIN_VERSION = "10.0.0.0"  # what the stand-in "TensorRT" reports
STANDIN_GPU = {
    "gpu": "ONNX Runtime stand-in (CPU)",
    "compute_capability": "0.0",
    "cuda": None,
    "driver": None,
}


@dataclass
class StandIn:
    """What the stand-in saw: one dict of bound `build_engine` arguments per build."""

    builds: list[dict[str, Any]] = field(default_factory=list)


def install(monkeypatch: Any) -> StandIn:
    """Replace the engine build and the runner (see the module docstring)."""
    from pgd_deploy.export import to_tensorrt
    from pgd_deploy.runtime import cuda_buffers, trt_backend

    real_build = to_tensorrt.build_engine
    signature = inspect.signature(real_build)
    record = StandIn()

    def build_engine(*args: Any, **kwargs: Any) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        to_tensorrt.check_build_options(
            hw_compat=a["hw_compat"], opt_level=a["opt_level"], workspace_gb=a["workspace_gb"]
        )
        to_tensorrt.check_nms_candidates(a["nms_candidates"], STANDIN_GPU["compute_capability"])
        record.builds.append(dict(a))
        Path(a["plan_path"]).write_bytes(Path(a["onnx_path"]).read_bytes())
        return to_tensorrt._build_info(
            SimpleNamespace(__version__=STANDIN_VERSION),
            dict(STANDIN_GPU),
            a["precision"],
            a["hw_compat"],
            a["version_compatible"],
            a["opt_level"],
            a["workspace_gb"],
            a["timing_cache"],
            a["input_name"],
            a["profile"].shapes(a["imgsz"]),
            0.0,
        )

    monkeypatch.setattr(to_tensorrt, "build_engine", build_engine)
    # the export's preflight asks for TensorRT before any work; the stand-in answers for it
    monkeypatch.setattr(to_tensorrt, "import_tensorrt", lambda: SimpleNamespace(__version__="0"))
    monkeypatch.setattr(cuda_buffers, "select_library", lambda: ("stand-in", None))
    monkeypatch.setattr(trt_backend, "TrtBackend", _ortplan_backend(trt_backend.TrtBackend))
    return record


def _ortplan_backend(real: type) -> type:
    class OrtPlanBackend(real):
        """The real TensorRT runner with ONNX Runtime in place of the engine."""

        def _open(self, device: int) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(
                self.path.read_bytes(), providers=["CPUExecutionProvider"]
            )
            self.gpu = STANDIN_GPU["gpu"]
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            profile = self.meta["tensorrt"]["profile"]
            self.batch_range = (int(profile["min"][0]), int(profile["max"][0]))
            self.max_batch = self.batch_range[1]
            self.in_graph_nms = "det_boxes" in self.output_names

        def _io_shapes(self) -> tuple[list, list]:
            return (
                [(i.name, list(i.shape)) for i in self.session.get_inputs()],
                [(o.name, list(o.shape)) for o in self.session.get_outputs()],
            )

        def _execute(self, images: np.ndarray) -> dict[str, np.ndarray]:
            lo, hi = self.batch_range
            assert lo <= len(images) <= hi, (len(images), self.batch_range)  # like the profile
            feed = {self.input_names[0]: np.ascontiguousarray(images, dtype=np.float32)}
            return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    return OrtPlanBackend
