"""What is checked before an exported artifact is served, in the one place every loader uses
(torch-free).

`pgd-export` writes an artifact, runs its accuracy gates, and only then completes the manifest
beside it with `status: passed` and the artifact's sha256. So an `.onnx` or `.plan` is served
(`open_artifact`: `pgd-serve predict`, the demo; `verify_artifact`: the Triton repository writer)
only when:

1. its manifest exists and is valid JSON (a missing one: the export never finished, or the file
   was not made by pgd-export);
2. the manifest says `passed` (`unchecked`: the gates never finished; `failed`: they failed,
   which `--allow-failed` overrides);
3. the file's sha256 is the one the manifest records (another model saved under the name, or
   damaged bytes, is refused with both hashes);
4. once opened, the fields the runtime relies on agree with what the artifact itself declares
   (input size, classes, category ids, outputs: `contract.manifest_disagreements`, checked by
   the backends).

`--allow-unverified` serves an artifact that fails 1, 3 or 4 (or is `unchecked`) anyway: each
failed check is logged as a warning and kept in the backend's `warnings` (predict's
`summary.json`, the demo's log). PyTorch checkpoints (.pt) have no manifest: they keep the
checkpoint loader's own checks (`torch.load(weights_only=True)`, config and weights agreeing).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import file_sha256
from pgd_deploy.runtime.manifest import manifest_path

logger = logging.getLogger(__name__)

ALLOW_UNVERIFIED = "--allow-unverified"
ALLOW_FAILED = "--allow-failed"
EXPORTED_SUFFIXES = (".onnx", ".plan", ".engine")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


class UnverifiedArtifactError(ValueError):
    """An exported artifact that its manifest does not vouch for (the message says which check
    failed and names the override)."""


@dataclass(frozen=True)
class Verification:
    """The outcome of `verify_artifact`.

    Attributes:
        path: the artifact.
        manifest: its manifest (None for a checkpoint, or a missing/unreadable one).
        sha256: the artifact's hash when it was computed.
        warnings: the checks that failed and were overridden (empty: fully verified).
    """

    path: Path
    manifest: dict[str, Any] | None
    sha256: str | None = None
    warnings: tuple[str, ...] = ()


_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def artifact_sha256(path: str | Path) -> str:
    """The file's hex SHA-256, computed once per (path, size, mtime) in this process: the demo
    and a predict run each open an artifact once, but a process that opens it again (a reload,
    several engines) does not read a large plan twice."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    digest = file_sha256(path)
    with _digests_lock:
        _digests[key] = digest
    return digest


def failed_gates(manifest: dict[str, Any]) -> list[str]:
    """The gates a manifest records as failed, e.g. ["parity (0.31, required 1e-05)"]."""
    results = (manifest.get("gates") or {}).get("results") or []
    return [
        f"{r.get('name', '?')} ({r.get('value', '?')}, required {r.get('threshold', '?')})"
        for r in results
        if isinstance(r, dict) and r.get("passed") is False
    ]


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest, None) or (None, why it cannot be used)."""
    where = manifest_path(path)
    if not where.is_file():
        return None, (
            f"no manifest {where} beside it: pgd-export completes the manifest only after the "
            "artifact passed its gates, so this export never finished (it was killed, exited "
            "early or ran out of disk) or the file was not made by pgd-export"
        )
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"its manifest {where} is not valid JSON ({err}): it was cut short or edited"
    if not isinstance(manifest, dict):
        return None, f"its manifest {where} holds a {type(manifest).__name__}, expected an object"
    return manifest, None


def _check_failed(path: Path, manifest: dict[str, Any], allow_failed: bool) -> str | None:
    """The warning for a `failed` export served with `allow_failed`; raises without it."""
    gates = failed_gates(manifest)
    message = (
        f"{path}: its manifest {manifest_path(path)} says status 'failed': the export did not "
        f"pass pgd-export's accuracy gates" + (f" ({'; '.join(gates)})" if gates else "")
    )
    if not allow_failed:
        raise ValueError(f"{message}. Re-export it, or pass {ALLOW_FAILED} to serve it anyway")
    logger.warning("%s; serving it anyway (%s)", message, ALLOW_FAILED)
    return f"{message}; served anyway ({ALLOW_FAILED})"


def _problems(path: Path, manifest: dict[str, Any]) -> tuple[list[str], str | None]:
    """(the failed checks of a readable manifest other than 'failed', the file's sha256)."""
    problems = []
    status = manifest.get("status")
    if status == "unchecked":
        problems.append(
            f"its manifest {manifest_path(path)} says status 'unchecked': its accuracy gates "
            "never finished (the export was interrupted or exited early, or the file was "
            "exported without gates)"
        )
    elif status not in ("passed", "failed"):
        problems.append(
            f"its manifest {manifest_path(path)} says status {status!r}, expected 'passed'"
        )
    recorded = manifest.get("sha256")
    if not recorded:
        problems.append(f"its manifest {manifest_path(path)} records no sha256 of the file")
        return problems, None
    actual = artifact_sha256(path)
    if actual != recorded:
        problems.append(
            f"sha256 mismatch: the manifest {manifest_path(path)} records {recorded} but the "
            f"file hashes to {actual}: the file changed after it was exported and gated "
            "(another model saved under its name, or damaged bytes)"
        )
    return problems, actual


def refuse_or_warn(path: str | Path, problems: list[str], allow_unverified: bool) -> list[str]:
    """Raise `UnverifiedArtifactError` for `problems` (the failed checks, each a sentence), or,
    with `allow_unverified`, log them and return them as warnings."""
    if not problems:
        return []
    text = "; ".join(problems)
    if not allow_unverified:
        raise UnverifiedArtifactError(
            f"{path}: not served, it is not verified: {text}. Re-export it with pgd-export "
            f"(or use the file its manifest describes), or pass {ALLOW_UNVERIFIED} to serve it "
            "anyway"
        )
    for problem in problems:
        logger.warning("%s: UNVERIFIED, served anyway (%s): %s", path, ALLOW_UNVERIFIED, problem)
    return [f"{path}: unverified ({ALLOW_UNVERIFIED}): {p}" for p in problems]


def verify_artifact(
    path: str | Path, *, allow_unverified: bool = False, allow_failed: bool = False
) -> Verification:
    """Checks 1-3 of the module docstring, before the artifact is loaded (the file is hashed
    once, `artifact_sha256`). A checkpoint or an unknown suffix passes through unchecked (its
    loader has its own checks and errors).

    Raises:
        FileNotFoundError: no such file.
        UnverifiedArtifactError: a failed check and not `allow_unverified`.
        ValueError: the manifest says 'failed' and not `allow_failed`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix.lower() not in EXPORTED_SUFFIXES:
        return Verification(path, None)
    manifest, unreadable = _read(path)
    if manifest is None:
        warnings = refuse_or_warn(path, [str(unreadable)], allow_unverified)
        return Verification(path, None, None, tuple(warnings))
    problems, digest = _problems(path, manifest)
    warnings = refuse_or_warn(path, problems, allow_unverified)
    if manifest.get("status") == "failed":
        warnings.append(str(_check_failed(path, manifest, allow_failed)))
    return Verification(path, manifest, digest, tuple(warnings))


def open_artifact(
    path: str | Path,
    *,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    allow_unverified: bool = False,
    allow_failed: bool = False,
) -> Any:
    """`verify_artifact`, then `backends.load_backend` (which runs check 4); the backend's
    `warnings` list every check that was overridden.

    Args:
        options: `load_backend`'s settings of a checkpoint (precision, compile, ...).
    """
    from pgd_deploy.runtime.backends import load_backend

    verified = verify_artifact(path, allow_unverified=allow_unverified, allow_failed=allow_failed)
    backend = load_backend(
        path, device=device, allow_unverified=allow_unverified, **(options or {})
    )
    backend.warnings = [*verified.warnings, *getattr(backend, "warnings", ())]
    return backend


def check_vouches(path: str | Path, manifest: dict[str, Any]) -> None:
    """Raise `UnverifiedArtifactError` unless `manifest` (in hand, e.g. the export's own) says
    `passed` and records the sha256 of `path` (the Triton repository writer, before it copies)."""
    problems, _ = _problems(Path(path), manifest)
    if manifest.get("status") == "failed":
        problems.insert(0, "its manifest says status 'failed' (it did not pass its gates)")
    refuse_or_warn(path, problems, allow_unverified=False)


def same_file_as_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Raise `UnverifiedArtifactError` unless `path` hashes to the manifest's sha256 (a copy
    checked after it was written, e.g. into a Triton repository)."""
    recorded, actual = manifest.get("sha256"), artifact_sha256(path)
    if recorded != actual:
        raise UnverifiedArtifactError(
            f"{path}: sha256 {actual} differs from the manifest's {recorded}: the copy is not "
            "the artifact that passed the gates (the disk or the copy failed)"
        )


__all__ = [
    "ALLOW_UNVERIFIED",
    "UnverifiedArtifactError",
    "Verification",
    "artifact_sha256",
    "check_vouches",
    "failed_gates",
    "open_artifact",
    "refuse_or_warn",
    "same_file_as_manifest",
    "verify_artifact",
]
