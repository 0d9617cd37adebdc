"""The console scripts' shared skeleton: exit codes, one-line errors, choices from the config."""

from __future__ import annotations

import pytest

from pgd_deploy.cli_support import choices, run_command
from pgd_deploy.config import ExportConfig, TrainConfig


def test_errors_become_exit_codes_with_one_line(capsys: pytest.CaptureFixture) -> None:
    def raises(err: BaseException):
        def command() -> int:
            raise err

        return command

    assert run_command("pgd-x", lambda: 4) == 4
    assert run_command("pgd-x", raises(ValueError("a.toml: bad key 'k'"))) == 2
    assert capsys.readouterr().err == "pgd-x: error: a.toml: bad key 'k'\n"
    assert run_command("pgd-x", raises(FileNotFoundError("no such file: m.pt"))) == 2
    assert run_command("pgd-x", raises(ImportError("install onnxruntime"))) == 2
    assert run_command("pgd-x", raises(RuntimeError("engine build failed"))) == 1
    assert run_command("pgd-x", raises(KeyboardInterrupt())) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("pgd-x: ") == 4


def test_flag_choices_are_the_config_literals() -> None:
    from pgd_deploy.export.command import _export_parser

    assert choices(ExportConfig, "precision") == ["fp32", "fp16", "int8"]
    assert choices(TrainConfig, "amp") == ["auto", "bf16", "fp16", "off"]
    with pytest.raises(TypeError, match="not a Literal"):
        choices(ExportConfig, "opset")
    actions = {a.dest: a for a in _export_parser()._actions}
    for dest in ("format", "precision", "int8_target", "nms", "calib_method", "exporter"):
        assert list(actions[dest].choices) == choices(ExportConfig, dest), dest
