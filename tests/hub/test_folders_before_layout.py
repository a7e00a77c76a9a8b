"""Folders saved by the code before the package was reorganised (commit 0401bbf; the fixture's generator is
tests/fixtures/save_before_layout.py) load exactly as they did: with the package's classes, through the tooling's
checked loader, with their own remote code where `sonett` is not installed, and with the current remote code. A
folder saved again keeps the config and the `auto_map` it had."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from sonett import SonettForCausalLM, SonettForConditionalGeneration
from sonett.hub.loading import load_model
from sonett.hub.upload import package_code_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sonett-before-layout"
KINDS = {"text": AutoModelForCausalLM, "hourglass": AutoModelForCausalLM, "vision": AutoModelForImageTextToText}


def expected_and_inputs(name: str) -> tuple[dict, dict]:
    expected = load_file(FIXTURES / name / "expected_outputs.safetensors")
    inputs = {key: expected[key] for key in ("input_ids", "pixel_values") if key in expected}
    return expected, inputs


# The current code computes linear attention in a faster order (docs/design.md, invariant 11): the same function, with
# fp32 rounding differences. Old folders' own code still gives their recorded logits bit for bit (run_without_sonett).
LOGITS_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def check_outputs(model, name: str) -> None:
    expected, inputs = expected_and_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected["logits"], **LOGITS_TOLERANCE)
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected["generated"])


@pytest.mark.parametrize("name", list(KINDS))
def test_an_old_folder_loads_with_the_package_classes_and_identical_outputs(name):
    model = KINDS[name].from_pretrained(FIXTURES / name).eval()
    assert type(model) is (SonettForConditionalGeneration if name == "vision" else SonettForCausalLM)
    check_outputs(model, name)


@pytest.mark.parametrize("name", list(KINDS))
def test_an_old_folder_loads_through_the_checked_loader(name):
    check_outputs(load_model(FIXTURES / name, auto_class=KINDS[name]).eval(), name)


@pytest.mark.parametrize("name", list(KINDS))
def test_an_old_folder_saved_again_keeps_its_config_and_auto_map(name, tmp_path):
    KINDS[name].from_pretrained(FIXTURES / name).save_pretrained(tmp_path)
    old, new = (json.loads((folder / "config.json").read_text()) for folder in (FIXTURES / name, tmp_path))
    old.pop("transformers_version"), new.pop("transformers_version")
    # from_pretrained stamps the loaded dtype on the vision sub-config (the old code did the same when saving again)
    (new.get("vision_config") or {}).pop("dtype", None)
    assert new == old
    assert {path.name for path in tmp_path.glob("*.py")} <= set(package_code_files())


def run_without_sonett(tmp_path: Path, folder: Path, name: str, exact: bool = True) -> None:
    """Load `folder` through its own remote code in a process without sonett; its logits must equal the recorded ones
    (bit for bit with `exact`, else within LOGITS_TOLERANCE: the current code's faster order rounds differently)."""
    script = NO_PACKAGE_PREAMBLE + textwrap.dedent(
        """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        folder, expected_file, kind, exact = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "exact"
        auto = AutoModelForImageTextToText if kind == "vision" else AutoModelForCausalLM
        expected = load_file(expected_file)
        inputs = {key: expected[key] for key in ("input_ids", "pixel_values") if key in expected}
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(**inputs).logits
        if exact:
            assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        else:
            torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
        print("identical" if exact else "equal within rounding")
        """
    )
    (tmp_path / "load.py").write_text(script)
    expected_file = FIXTURES / name / "expected_outputs.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "load.py"),
            str(folder),
            str(expected_file),
            name,
            "exact" if exact else "close",
        ],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert ("identical" if exact else "equal within rounding") in result.stdout


def test_an_old_folder_runs_its_own_remote_code_where_sonett_is_not_installed(tmp_path):
    folder = tmp_path / "text"
    shutil.copytree(FIXTURES / "text", folder)
    run_without_sonett(tmp_path, folder, "text")


def test_old_weights_and_config_run_with_the_current_remote_code(tmp_path):
    folder = tmp_path / "vision"
    AutoModelForImageTextToText.from_pretrained(FIXTURES / "vision").save_pretrained(folder)  # the current .py files
    for file in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "vision" / file, folder / file)
    run_without_sonett(tmp_path, folder, "vision", exact=False)
