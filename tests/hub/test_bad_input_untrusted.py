"""The bad-input matrix, untrusted files: no pickle anywhere. No source unpickles or calls `torch.load`
without `weights_only=True` (an AST scanner, itself tested), and the folders and memory files Sonett
writes hold no pickle (docs/design.md, invariant 10)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers_bad_input import bad_input_tokenizer, write_memory_file
from helpers_model import tiny_model
from helpers_vision import VISION

from sonett import SonettForConditionalGeneration, SonettImageProcessor, SonettProcessor
from sonett.hub.saving import write_model_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    """Sliding and full attention, max_position_embeddings 256."""
    return tiny_model("mixed")


@pytest.fixture(scope="module")
def tokenizer():
    return bad_input_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory, model):
    """The state of `model` after 6 tokens, saved as a memory file."""
    return write_memory_file(tmp_path_factory.mktemp("memory") / "state.safetensors", model)


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_EXCEPTIONS = {"UnpicklingError", "PickleError", "PicklingError"}


def unsafe_loads(source: str) -> list[str]:
    """`torch.load(...)` calls without `weights_only=True`, imports of unpicklers (a module that imports `pickle` only
    to name its exception classes passes), `numpy.load(..., allow_pickle=True)` and `pandas.read_pickle`."""
    tree = ast.parse(source)
    found, pickle_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS:
                    pickle_names.add(alias.asname or alias.name)
                    if alias.name.split(".")[0] != "pickle":
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            names = {alias.name for alias in node.names}
            if not names <= PICKLE_EXCEPTIONS:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"line {node.lineno}: numpy.load with allow_pickle")
            if node.func.attr == "read_pickle":
                found.append(f"line {node.lineno}: read_pickle")
    for node in ast.walk(tree):  # `import pickle` is fine only for its exception classes
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in pickle_names:
            if node.attr not in PICKLE_EXCEPTIONS:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif (
            isinstance(node, ast.Name)
            and node.id in pickle_names
            and not isinstance(getattr(node, "ctx", None), ast.Load)
        ):
            found.append(f"line {node.lineno}: rebinds {node.id}")
    return found


def test_the_scanner_flags_each_unsafe_pattern():
    unsafe = {
        "import torch\ntorch.load('f')": "torch.load without weights_only=True",
        "import torch\ntorch.load('f', weights_only=False)": "torch.load without weights_only=True",
        "import pickle\npickle.load(open('f', 'rb'))": "pickle.load",
        "import pickle as p\np.loads(b'')": "p.loads",
        "from pickle import load": "from pickle import load",
        "import dill": "import dill",
        "import numpy as np\nnp.load('f', allow_pickle=True)": "allow_pickle",
        "import pandas as pd\npd.read_pickle('f')": "read_pickle",
    }
    for source, expected in unsafe.items():
        assert any(expected in line for line in unsafe_loads(source)), source
    safe = [
        "import torch\ntorch.load('f', weights_only=True)",
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
        "from pickle import UnpicklingError",
        "import numpy as np\nnp.load('f.npy')",
    ]
    for source in safe:
        assert unsafe_loads(source) == [], source


def test_no_source_unpickles_or_loads_torch_files_unsafely():
    sources = sorted((ROOT / "modeling").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(sources) > 20
    problems = {str(path.relative_to(ROOT)): unsafe_loads(path.read_text()) for path in sources}
    assert {name: found for name, found in problems.items() if found} == {}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def assert_no_pickle(folder_or_file: Path) -> int:
    """No file is a pickle by name or by content (pickle protocol 2+ opcode, or torch.save's zip); returns the count."""
    paths = [folder_or_file] if folder_or_file.is_file() else [p for p in folder_or_file.rglob("*") if p.is_file()]
    for path in paths:
        head = path.read_bytes()[:4]
        assert not path.name.endswith(PICKLE_SUFFIXES), path
        assert not (head[:1] == b"\x80" and 2 <= head[1] <= 5), path
        assert head != b"PK\x03\x04", path
    return len(paths)


def test_saved_folders_and_memory_files_hold_no_pickle(model, tokenizer, processor, memory_file, tmp_path):
    text = tiny_model("mixed", vocab_size=len(tokenizer))
    write_model_folder(text, tokenizer, tmp_path / "text", {"training_data": "unit test", "steps": 0})
    vision = SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[0], vision_config=VISION, image_token_id=tokenizer.image_token_id
    )
    vision.save_pretrained(tmp_path / "vision")
    processor.save_pretrained(tmp_path / "vision")
    assert assert_no_pickle(tmp_path / "text") >= 10
    assert assert_no_pickle(tmp_path / "vision") >= 10
    assert assert_no_pickle(memory_file) == 1
    assert (tmp_path / "text" / "model.safetensors").is_file() and (tmp_path / "vision" / "model.safetensors").is_file()
    with pytest.raises(AssertionError):  # the check can fail
        torch.save({"x": torch.zeros(1)}, tmp_path / "state.safetensors")
        assert_no_pickle(tmp_path / "state.safetensors")
