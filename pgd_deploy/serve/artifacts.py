"""What `pgd-serve` checks about an artifact before and after it loads it (torch-free).

An export (.onnx, .plan) is opened only when its manifest vouches for it (`runtime.verify`:
manifest present, status `passed`, sha256 of the file, fields agreeing with the model);
`--allow-unverified` and, for a `failed` export, `--allow-failed` serve it anyway with a warning
that stays in the backend's `warnings`. A checkpoint run at fp16/bf16 or compiled is gated when
it is opened (`open_gated`): against itself in fp32 eager, on the first images it will serve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.verify import open_artifact

logger = logging.getLogger(__name__)


def open_gated(
    path: str | Path,
    images: Sequence[np.ndarray],
    *,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    allow_failed: bool = False,
    allow_unverified: bool = False,
    source: str = "",
    gates: Any = None,
) -> Any:
    """`runtime.verify.open_artifact` (an export is verified before it loads), then, for a
    checkpoint at fp16/bf16 or compiled (`options`, see `ServeConfig.torch_options`), the export
    gates against its fp32 eager self on `images` (`gates`: a `GatesConfig`, default the export
    defaults).

    Raises:
        ValueError: the gates failed and `allow_failed` is False (the message names the
            checkpoint, the settings and the failed gates), or `open_artifact`'s errors (an
            export its manifest does not vouch for, unless allowed).
    """
    backend = open_artifact(
        path,
        device=device,
        options=options,
        allow_unverified=allow_unverified,
        allow_failed=allow_failed,
    )
    if backend.name != "torch" or not (backend.autocast_dtype or backend.compiled):
        return backend
    if not images:
        logger.warning("%s: %s runs ungated (no gate images)", path, backend.describe())
        return backend
    from pgd_deploy.export.gates import gate_torch_backend
    from pgd_deploy.export.images import ImageSet

    image_set = ImageSet(source or f"{len(images)} images", arrays=list(images))
    report = gate_torch_backend(
        backend, image_set, gates=gates, batch_size=min(8, backend.max_batch)
    )
    logger.info("%s\n%s", path, report.to_markdown())
    if report.passed:
        return backend
    failed = [
        f"{r.name} ({r.value}, required {r.threshold})" for r in report.results if r.passed is False
    ]
    message = (
        f"{path}: {backend.describe()} fails the export gates against fp32 eager on "
        f"{report.images} images from {report.image_source} ({'; '.join(failed)})"
    )
    if not allow_failed:
        raise ValueError(f"{message}. Use --precision fp32, or --allow-failed to serve it anyway")
    logger.warning("%s; serving it anyway (--allow-failed)", message)
    backend.warnings = [*backend.warnings, f"{message}; served anyway (--allow-failed)"]
    return backend
