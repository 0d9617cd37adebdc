"""Triton's own schema for config.pbtxt: `inference.ModelConfig` from tritonclient, parsed strictly.

`google.protobuf.text_format.Parse` refuses unknown fields, wrong types, unknown enum values and
repeated singular fields, exactly as Triton's model loader does before it looks at the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def parse_model_config(text: str) -> Any:
    """The parsed `ModelConfig` (skips the test when tritonclient is not installed)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_model_config(model_dir: Path) -> Any:
    return parse_model_config((Path(model_dir) / "config.pbtxt").read_text())


def dims(config: Any, kind: str) -> dict[str, list[int]]:
    """{tensor name: dims} of the config's "input" or "output" entries."""
    return {t.name: list(t.dims) for t in getattr(config, kind)}
