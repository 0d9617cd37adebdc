"""What `pgd-serve` checks about an artifact before it loads it (torch-free).

An export whose manifest says `failed` did not pass pgd-export's accuracy gates (it is kept for
inspection, and pgd-export exited non-zero): serving it needs `--allow-failed`, and then it is
served with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
