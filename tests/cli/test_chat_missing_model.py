"""`sonett chat` on a model that is neither a local folder nor a reachable Hub repository says so (exit 2), instead
of transformers' "Repo id must be in the form ..." or "couldn't connect to huggingface.co" traceback."""

import contextlib
import io

import pytest

from sonett.cli.main import main as sonett


@pytest.mark.parametrize("name", ["absolute", "relative"])
def test_chat_names_a_missing_model_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nothere") if name == "absolute" else "./nothere"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit:
        sonett(["chat", missing])
    assert exit.value.code == 2
    text = out.getvalue()
    assert f"sonett chat: error: {missing} is neither a model folder nor a Hub repository" in text
    assert "sonett train" in text and "Traceback" not in text


def test_serve_names_a_missing_model_folder(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit:
        sonett(["serve", "./nothere"])
    assert exit.value.code == 2
    text = out.getvalue()
    assert "sonett serve: error: ./nothere is neither a model folder nor a Hub repository" in text
    assert "sonett train" in text and "Traceback" not in text
