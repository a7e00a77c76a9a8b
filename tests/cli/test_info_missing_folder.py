"""`sonett info PATH` on a path that does not exist says no folder is there, not "No preset 'runs/x'"."""

import contextlib
import io

import pytest

from sonett.cli.main import main as sonett


@pytest.mark.parametrize("target", ["runs/nothere", "nothere.json"])
def test_info_names_a_missing_folder_or_file(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit:
        sonett(["info", target])
    assert exit.value.code == 2
    text = out.getvalue()
    assert f"No model folder or preset file at {target}" in text and "sonett-tiny-constant" in text
    assert "No preset" not in text
