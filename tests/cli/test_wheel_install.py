"""The wheel as a newcomer installs it: built from a clean copy of the checkout, installed (not editable) into a
fresh virtual environment, first the core alone, then with the `[train]` extra, each pinned by constraints.txt.

- the wheel holds exactly the package's files, the presets, the accelerate configs, the metrics, the card template,
  the digits data and the `sonett` entry point, and declares only the inference packages as core dependencies;
- with the core install, `import sonett` loads a folder and generates (identical outputs to those recorded), and
  a command that needs an extra fails naming `pip install "sonett[train]"`;
- with `[train]`, `sonett train --max_steps 3 --config sonett-tiny` trains a preset by name (the package data),
  and the folder it writes loads with `AutoModelForCausalLM(..., trust_remote_code=True)` from its own code, with
  the installed sonett package made unimportable.

It installs torch and the other packages from pip's cache or index (network only the first time), so it is the
slowest test; deselect it with `-m "not wheel"`.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
FIXTURE = ROOT / "tests" / "fixtures" / "sonett-main-2026-12"  # a tiny folder with recorded outputs
CORE_REQUIREMENTS = {"torch", "transformers", "safetensors", "tokenizers", "huggingface-hub", "jinja2"}
EXTRAS = {"train", "vision", "eval", "serve", "gpu", "deepspeed", "dev"}
INSTALL_TIMEOUT = 900  # seconds; about a minute each from pip's cache on a 2-core machine
TRAIN_FLAGS = [
    "--max_steps", "3", "--config", "sonett-tiny", "--max_documents", "20", "--vocab_size", "512",
    "--block_size", "64", "--batch_size", "2", "--eval_steps", "0", "--eval_blocks", "2", "--report_to", "none",
]  # fmt: skip


def clean_copy(destination: Path) -> Path:
    """The checkout's tracked and new (not ignored) files, without build outputs, venvs or caches."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would make the checkout importable."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip_install(python: Path, *requirements: str) -> None:
    """`pip install -c constraints.txt REQUIREMENTS` into the venv of `python`, with this venv's pip."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile"]
    started = time.perf_counter()
    result = subprocess.run(
        [*command, "-c", str(CONSTRAINTS), *requirements],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=INSTALL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"pip install {' '.join(requirements)}: {time.perf_counter() - started:.0f} s")  # shown with pytest -s


def run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, env=clean_env(), timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the checkout."""
    source = clean_copy(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", out, source]
    result = run(build, cwd=source)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("sonett-*.whl")
    return path


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no pip, no system site-packages) holding the wheel and its core dependencies only."""
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(folder)
    pip_install(folder / "bin" / "python", str(wheel))
    return folder


def test_wheel_holds_the_package_its_data_and_the_entry_point(wheel, tmp_path):
    checkout = clean_copy(tmp_path)
    package = {
        "sonett/" + path.relative_to(checkout / "modeling" / "sonett").as_posix()
        for path in (checkout / "modeling" / "sonett").rglob("*")
        if path.is_file()
    }
    presets = {
        "sonett/configuration/" + path.relative_to(checkout / "configuration").as_posix()
        for path in (checkout / "configuration").rglob("*")
        if path.is_file()
    }
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        files = {name for name in names if ".dist-info/" not in name}
        info = {name.split("/", 1)[1]: name for name in names if ".dist-info/" in name}
        entry_points = archive.read(info["entry_points.txt"]).decode()
        metadata = archive.read(info["METADATA"]).decode()
    assert files == package | presets
    for required in (
        "sonett/model/modeling_sonett.py",  # the shipped model: a folder without __init__.py
        "sonett/configuration/sonett-tiny.json",
        "sonett/configuration/accelerate/multi_gpu.yaml",
        "sonett/evaluation/metrics/perplexity/perplexity.py",
        "sonett/hub/model_card_template.md",
        "sonett/data/digits.npz",
    ):
        assert required in files
    assert "sonett/model/__init__.py" not in files
    assert "[console_scripts]\nsonett = sonett.cli.main:main" in entry_points
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    core = {requirement.split(">")[0].split("=")[0].split("<")[0] for requirement in requires if ";" not in requirement}
    assert core == CORE_REQUIREMENTS
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert extras == EXTRAS
    assert not any("scikit-learn" in requirement for requirement in requires)


CORE_CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import sonett

    folder = sys.argv[1]
    expected = load_file(folder + "/expected_outputs.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        # the same within fp32 rounding (faster kernels, issue 17); the greedy tokens exactly
        same_logits = bool((model(expected["input_ids"]).logits - expected["logits"]).abs().max() <= 1e-5)
        generated = model.generate(expected["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    try:
        sonett.SonettProcessor
        vision_error = None
    except ImportError as error:
        vision_error = str(error)
    print("RESULT " + json.dumps({
        "file": sonett.__file__,
        "model": type(model).__module__,
        "same_logits": same_logits,
        "same_generated": torch.equal(generated, expected["generated"]),
        "chat": chat,
        "vision_error": vision_error,
        "absent": [name for name in ("accelerate", "datasets", "PIL", "peft", "sklearn")
                   if importlib.util.find_spec(name) is None],
    }))
    """
)

REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["sonett"] = None  # the installed package is unimportable: only the folder's own code may run
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    print("RESULT " + json.dumps({
        "model": type(model).__module__,
        "vocab": model.config.vocab_size,
        "new_tokens": out.shape[1] - ids.shape[1],
        "sonett_modules": sorted(name for name, module in sys.modules.items()
                                 if module is not None and name.split(".")[0] == "sonett"),
    }))
    """
)


def result_of(process: subprocess.CompletedProcess) -> dict:
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return json.loads(process.stdout.split("RESULT ", 1)[1])


def test_core_install_loads_and_generates_and_names_the_missing_extra(core_venv, tmp_path):
    python, sonett = core_venv / "bin" / "python", core_venv / "bin" / "sonett"
    result = result_of(run([python, "-c", CORE_CHECK, FIXTURE], cwd=tmp_path))
    assert result["file"].startswith(str(core_venv)), result["file"]  # the installed wheel, not the checkout
    assert result["model"] == "sonett.model.modeling_sonett"
    assert result["same_logits"] and result["same_generated"]
    assert "hi" in result["chat"]  # the chat template renders (jinja2 is a core dependency)
    assert result["absent"] == ["accelerate", "datasets", "PIL", "peft", "sklearn"]
    assert 'pip install "sonett[vision]"' in result["vision_error"]

    chat = run([sonett, "chat", "--help"], cwd=tmp_path)  # an inference command runs on the core install
    assert chat.returncode == 0 and "usage" in chat.stdout, chat.stderr[-2000:]
    train = run([sonett, "train", "--help"], cwd=tmp_path)
    assert train.returncode == 1
    assert 'pip install "sonett[train]"' in train.stderr and "Traceback" not in train.stderr, train.stderr[-2000:]


def test_train_extra_trains_a_preset_by_name_into_a_folder_that_loads_as_remote_code(core_venv, wheel, tmp_path):
    python = core_venv / "bin" / "python"
    pip_install(python, f"sonett[train] @ {wheel.as_uri()}")
    output = tmp_path / "tiny"
    started = time.perf_counter()
    trained = run([core_venv / "bin" / "sonett", "train", *TRAIN_FLAGS, "--output_dir", output], cwd=tmp_path)
    print(f"sonett train: {time.perf_counter() - started:.0f} s")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "validation loss" in trained.stdout
    assert not (tmp_path / "runs").exists()  # written where asked, nowhere else
    results = json.loads((output / "training_results.json").read_text())
    assert results["steps"] == 3

    loaded = result_of(run([python, "-c", REMOTE_CODE_CHECK, output], cwd=tmp_path))
    assert loaded["model"].startswith("transformers_modules."), loaded["model"]  # the folder's own code
    assert loaded["sonett_modules"] == []
    assert loaded["vocab"] == 512 and loaded["new_tokens"] == 3
