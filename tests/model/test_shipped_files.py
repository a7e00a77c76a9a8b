"""The shipped model is exactly the folder `sonett/model/`: `save_pretrained` copies every file in it and nothing
else, and none of them imports anything of the sonett package outside that folder (docs/design.md, "the shipped
model"). A folder saved by this code keeps the `auto_map` that folders saved before the reorganisation carry."""

import ast
import json
from pathlib import Path

import pytest
from helpers_model import tiny_config

import sonett
from sonett.hub.upload import package_code_files

MODEL_DIR = Path(sonett.__file__).resolve().parent / "model"
OLD_FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "sonett-main-2026-12"


def test_the_shipped_model_folder_holds_only_python_files_and_no_package_marker():
    entries = sorted(path.name for path in MODEL_DIR.iterdir() if path.name != "__pycache__")
    assert entries == sorted(package_code_files()), "sonett/model/ must hold exactly the shipped files"
    assert "__init__.py" not in entries
    assert all(name.endswith("_sonett.py") for name in entries)


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda path: path.name)
def test_a_shipped_file_imports_only_its_siblings_and_libraries(path):
    siblings = {p.stem for p in MODEL_DIR.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in siblings, f"{path.name}: from {'.' * node.level}{node.module}"
        names = [alias.name for alias in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        module = node.module if isinstance(node, ast.ImportFrom) and not node.level else None
        for name in [*names, module] if isinstance(node, ast.Import) else [module]:
            assert not (name or "").startswith("sonett"), f"{path.name} imports {name} from the tooling"


def test_save_pretrained_writes_only_shipped_files_byte_for_byte(tmp_path):
    sonett.SonettForCausalLM(tiny_config()).save_pretrained(tmp_path)
    written = {path.name for path in tmp_path.glob("*.py")}
    assert "modeling_sonett.py" in written and written <= set(package_code_files())
    for name in written:
        assert (tmp_path / name).read_bytes() == (MODEL_DIR / name).read_bytes()


def test_a_new_folder_keeps_the_auto_map_of_a_folder_saved_before_the_reorganisation(tmp_path):
    old = json.loads((OLD_FOLDER / "config.json").read_text())["auto_map"]
    config = tiny_config()
    sonett.SonettForCausalLM(config).save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {key: new[key] for key in old} == old
