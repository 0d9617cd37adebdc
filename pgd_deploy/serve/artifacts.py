"""What `pgd-serve` checks about an artifact before and after it loads it (torch-free).

An export whose manifest says `failed` did not pass pgd-export's accuracy gates (it is kept for
inspection, and pgd-export exited non-zero): serving it needs `--allow-failed`, and then it is
served with a warning. A checkpoint run at fp16/bf16 or compiled is gated the same way when it
is opened (`open_gated`): against itself in fp32 eager, on the first images it will serve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.manifest import manifest_path, read_manifest

logger = logging.getLogger(__name__)


def failed_gates(manifest: dict[str, Any]) -> list[str]:
    """The gates a manifest records as failed, e.g. ["parity (0.31 > 1e-12)"]."""
    results = (manifest.get("gates") or {}).get("results") or []
    return [
        f"{r.get('name', '?')} ({r.get('value', '?')}, required {r.get('threshold', '?')})"
        for r in results
        if isinstance(r, dict) and r.get("passed") is False
    ]


def check_export_status(path: str | Path, *, allow_failed: bool = False) -> None:
    """Refuse (or, with `allow_failed`, warn about) an artifact whose manifest says `failed`.

    Artifacts without a manifest (checkpoints, foreign ONNX files) are not checked here.

    Raises:
        ValueError: the manifest says `failed` and `allow_failed` is False; the message names
            the artifact, the manifest and the failed gates.
    """
    manifest = read_manifest(path)
    if not manifest or manifest.get("status") != "failed":
        return
    gates = failed_gates(manifest)
    message = (
        f"{path}: its manifest {manifest_path(path)} says status 'failed': the export did not "
        f"pass pgd-export's accuracy gates" + (f" ({'; '.join(gates)})" if gates else "")
    )
    if not allow_failed:
        raise ValueError(f"{message}. Re-export it, or pass --allow-failed to serve it anyway")
    logger.warning("%s; serving it anyway (--allow-failed)", message)


def open_gated(
    path: str | Path,
    images: Sequence[np.ndarray],
    *,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    allow_failed: bool = False,
    source: str = "",
    gates: Any = None,
) -> Any:
    """`load_backend`, then, for a checkpoint at fp16/bf16 or compiled (`options`, see
    `ServeConfig.torch_options`), the export gates against its fp32 eager self on `images`
    (`gates`: a `GatesConfig`, default the export defaults).

    Raises:
        ValueError: the gates failed and `allow_failed` is False (the message names the
            checkpoint, the settings and the failed gates), or `load_backend`'s errors.
    """
    from pgd_deploy.runtime.backends import load_backend

    options = options or {}
    backend = load_backend(path, device=device, **options)
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
    return backend
