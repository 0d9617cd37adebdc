"""Starting a run in a work folder (workdir.check_start): nothing of a previous run is replaced
without --resume or --overwrite, even when it left a single file."""

from __future__ import annotations

import pytest

from pgd_deploy.workdir import RUN_FILES, check_start


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_holding_one_run_file_is_refused(tmp_path, name):
    """Only the last.pt of an interrupted run, or only its metrics: refused like a full run."""
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=f"already holds a training run \\({name}\\)"):
        check_start(tmp_path, resume=False, overwrite=False)
    check_start(tmp_path, resume=False, overwrite=True)  # replacing it was asked for


def test_an_empty_or_foreign_folder_starts_and_resume_needs_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    check_start(tmp_path, resume=False, overwrite=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_start(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="choose one"):
        check_start(tmp_path, resume=True, overwrite=True)
