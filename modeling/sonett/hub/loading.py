"""Load tokenizers and model folders in the tooling without running any Python file they hold.

Importing `sonett` registers Sonett with the transformers Auto classes, so the tooling (training, fine-tuning,
evaluation, chat, serving, comparisons, scripts) loads every folder with the package's own classes and
`trust_remote_code=False`. A saved folder still carries the package's code files, so that it loads anywhere with
`trust_remote_code=True`: that is the user's choice, never the tooling's. A local folder is checked before anything
of it is read:

- A tokenizer is data. A tokenizer folder (a checkpoint's `tokenizer/`, `--tokenizer`) may hold no `.py` file,
  and its `tokenizer_config.json` no `auto_map`.
- A model folder (it has a `config.json`) may hold the package's shipped code files (`*_sonett.py`) only (and no
  `custom_generate/` code, which transformers runs in place of `generate` with `trust_remote_code=True`), every
  `auto_map` entry of its config files must name a class of those files, and `tokenizer_config.json` may not map
  `AutoTokenizer` to code. A shipped file whose text differs from the installed package's (a folder saved by an
  older version, or an edited one) is named in a warning only: the tooling runs the package's code, never the
  folder's.

A folder that breaks these rules raises `UntrustedCodeError`, naming the file and the fix. A Hub repository is
checked after loading (its config's and tokenizer's `auto_map`); no code of it runs either way. `check_saved_code`
keeps code from elsewhere out of the folders the tooling writes (`sonett.hub.saving.save_model_and_tokenizer`).

Why `trust_remote_code=False` and not the registration alone: with `True`, transformers 5.24 prefers a registered
class over a config's `auto_map` for the config and the model (`explicit_local_code`), but not for the tokenizer
(`SonettConfig` is registered with `TOKENIZER_MAPPING`, so a tokenizer `auto_map` wins and its module is imported),
nor for a folder whose `model_type` is not registered. With `False`, `resolve_trust_remote_code` keeps `False`
while local code exists and raises otherwise, so nothing of the folder is imported.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

from sonett.hub.upload import CODE_CONFIG_FILES, package_code_files

logger = logging.getLogger(__name__)

# The model's code files, which `save_pretrained` copies into every model folder: name -> the installed copy (the
# package's `*_sonett.py`; docs/design.md, "The shipped model": the list is the folder's contents, never by hand).
SHIPPED_CODE = package_code_files()
SHIPPED_CODE_FILES = frozenset(SHIPPED_CODE)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FIX = (
    "A tokenizer is data: the Sonett tooling never runs a tokenizer's code. Delete the Python files and the "
    "auto_map entry (a tokenizer Sonett saved has neither), or use another tokenizer folder (for a checkpoint's, "
    "resume from another checkpoint)."
)
MODEL_FIX = (
    "The Sonett tooling loads model folders with the sonett package's own classes and runs no code from a folder. "
    "Delete these files and entries, or save the model again with the sonett package (save_pretrained writes only "
    "the package's code)."
)


class UntrustedCodeError(ValueError):
    """A folder holds Python code (or an `auto_map` naming code) that the tooling would have to run."""


# The subfolder whose `generate.py` transformers runs in place of `generate` when a model folder loads with
# `trust_remote_code=True` (`GenerationMixin.load_custom_generate`).
CUSTOM_GENERATE_DIR = "custom_generate"


def _python_files(folder: Path) -> list[str]:
    """The `.py` files that transformers may import from `folder` (paths relative to it): those directly in it (an
    `auto_map` entry names a flat module) and those in `custom_generate/`. Other subfolders (a fine-tuning run's
    `merged/` model) are not part of it."""
    found = [*folder.glob("*.py"), *folder.glob(f"{CUSTOM_GENERATE_DIR}/**/*.py")]
    return sorted(p.relative_to(folder).as_posix() for p in found if p.is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UntrustedCodeError(f"{path} is not readable JSON ({error}); save the folder again.") from error


def _auto_map_entries(value: Any) -> Iterator[tuple[str, str | None]]:
    """Every (Auto class, `module.Class` or None) pair under any `auto_map` key of a JSON value, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key != "auto_map":
                yield from _auto_map_entries(item)
            elif isinstance(item, dict):
                for auto_class, reference in item.items():
                    for entry in reference if isinstance(reference, list | tuple) else [reference]:
                        yield auto_class, entry
            else:  # the legacy list form of a tokenizer's auto_map
                for entry in item if isinstance(item, list | tuple) else [item]:
                    yield "AutoTokenizer", entry
    elif isinstance(value, list):
        for item in value:
            yield from _auto_map_entries(item)


def _reference_problem(reference: object) -> str | None:
    """Why an `auto_map` reference does not name a class of the package's shipped code files (None if it does)."""
    if not isinstance(reference, str):
        return f"{reference!r} is not a `module.Class` name"
    module, _, name = reference.rpartition(".")
    if "--" in reference:
        return f"{reference!r} names code in another repository"
    if f"{module}.py" not in SHIPPED_CODE_FILES:
        return f"{module}.py is not one of the sonett package's code files"
    if not isinstance(getattr(importlib.import_module(f"sonett.model.{module}"), name, None), type):
        return f"{module}.py of the sonett package defines no class {name}"
    return None


def auto_map_problems(value: Any, source: str) -> list[str]:
    """What is wrong with the `auto_map` entries of `value` (the JSON of `source`) in a model folder or repository.

    Every entry must name a class of the package's shipped code, and none may map `AutoTokenizer` (Sonett's
    tokenizer is transformers' own `TokenizersBackend`).
    """
    problems = []
    for auto_class, reference in _auto_map_entries(value):
        if reference is None:
            continue
        if auto_class == "AutoTokenizer":
            problems.append(f"{source} maps AutoTokenizer to {reference!r} (a tokenizer is data, not code)")
        elif (reason := _reference_problem(reference)) is not None:
            problems.append(f"{source} maps {auto_class} to {reference!r}: {reason}")
    return problems


def check_tokenizer_folder(folder: str | Path) -> None:
    """Refuse a tokenizer-only folder that holds a `.py` file or whose tokenizer_config.json has an `auto_map`.

    Raises:
        UntrustedCodeError: naming each file and the fix.
    """
    folder = Path(folder)
    problems = [f"{name} is a Python file" for name in _python_files(folder)]
    config_file = folder / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        config = _read_json(config_file)
        if isinstance(config, dict) and "auto_map" in config:
            problems.append(f"{TOKENIZER_CONFIG_FILE} has an auto_map ({json.dumps(config['auto_map'])})")
    if problems:
        raise UntrustedCodeError(f"The tokenizer folder {folder} holds code: {'; '.join(problems)}. {TOKENIZER_FIX}")


def check_model_folder(folder: str | Path) -> None:
    """Refuse a model folder that holds code other than the package's shipped files, or names other code.

    A shipped file whose text differs from the installed package's is named in a warning: it is never run.

    Raises:
        UntrustedCodeError: naming each file and the fix.
    """
    folder = Path(folder)
    problems, changed = [], []
    for name in _python_files(folder):
        if name not in SHIPPED_CODE_FILES:
            problems.append(f"{name} is not one of the sonett package's code files")
        elif (folder / name).read_bytes() != SHIPPED_CODE[name].read_bytes():
            changed.append(name)
    for name in CODE_CONFIG_FILES:
        if (folder / name).is_file():
            problems += auto_map_problems(_read_json(folder / name), name)
    if problems:
        raise UntrustedCodeError(f"The model folder {folder} holds code: {'; '.join(problems)}. {MODEL_FIX}")
    if changed:
        logger.warning(
            "%s: %s differ from the installed sonett package's code; the package's code is used, the folder's is "
            "never run (save the model again to write the package's files)",
            folder,
            ", ".join(changed),
        )


def check_folder(name_or_path: str | Path, tokenizer_only: bool = False) -> None:
    """`check_model_folder` for a local folder with a config.json, `check_tokenizer_folder` for another local folder
    (or any folder when `tokenizer_only`); nothing for a Hub id (checked after loading)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return
    if tokenizer_only or not (path / "config.json").is_file():
        check_tokenizer_folder(path)
    else:
        check_model_folder(path)


def _refuse(problems: list[str], name_or_path: str | Path) -> None:
    if problems:
        raise UntrustedCodeError(f"{name_or_path} names code: {'; '.join(problems)}. {MODEL_FIX}")


def load_tokenizer(name_or_path: str | Path, tokenizer_only: bool = False, **kwargs: Any) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)` after `check_folder`.

    Args:
        name_or_path: a tokenizer folder, a model folder or a Hub id.
        tokenizer_only: hold the folder to the tokenizer-folder rule even if it has a config.json (a checkpoint's
            tokenizer, which Sonett wrote without one).

    Raises:
        UntrustedCodeError: the folder (or the repository's tokenizer_config.json) holds or names code.
    """
    check_folder(name_or_path, tokenizer_only=tokenizer_only)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
    _refuse(auto_map_problems({"auto_map": tokenizer.init_kwargs.get("auto_map")}, TOKENIZER_CONFIG_FILE), name_or_path)
    return tokenizer


def load_model(name_or_path: str | Path, auto_class: type = AutoModelForCausalLM, **kwargs: Any) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)` after `check_folder`.

    Sonett folders load as the package's registered classes; transformers' own architectures (the Llama baselines)
    as themselves.

    Raises:
        UntrustedCodeError: the folder (or the repository's config) holds or names code, or the model needs code
            of its own to load.
    """
    check_folder(name_or_path)
    try:
        model = auto_class.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise UntrustedCodeError(
            f"{name_or_path} needs its own Python code to load, and the Sonett tooling runs no code from a model "
            "folder or repository; pass a Sonett model or an architecture that transformers ships."
        ) from error
    _refuse(auto_map_problems(model.config.to_dict(), "config.json"), name_or_path)
    return model


def _runs_folder_code(obj: object) -> bool:
    """Whether `obj`'s class was imported from a folder's code (`trust_remote_code=True`)."""
    return type(obj).__module__.split(".")[0] == TRANSFORMERS_DYNAMIC_MODULE_NAME


def check_saved_code(folder: str | Path, *objects: object) -> None:
    """Refuse to save `objects` (a model, a tokenizer or processor) into `folder` when that would leave code other
    than the package's shipped files there: an object whose class came from a folder's code (its `save_pretrained`
    would copy that code), a config or tokenizer whose `auto_map` names other code, or a foreign `.py` file already
    in `folder`.

    Raises:
        UntrustedCodeError: naming the object or file and the fix.
    """
    folder = Path(folder)
    problems = []
    parts = [obj for obj in objects if obj is not None]
    parts += [getattr(obj, name, None) for obj in parts for name in ("tokenizer", "image_processor")]
    for obj in filter(None, parts):
        name = type(obj).__name__
        if _runs_folder_code(obj):
            problems.append(
                f"{name} was loaded from a folder's own code (trust_remote_code=True) and saving it would copy that "
                "code; load it with the sonett package's classes (trust_remote_code=False)"
            )
        init_kwargs = getattr(obj, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            problems += auto_map_problems({"auto_map": init_kwargs.get("auto_map")}, f"{name} (tokenizer_config.json)")
        config = getattr(obj, "config", None)
        if config is not None:
            problems += auto_map_problems({"auto_map": getattr(config, "auto_map", None)}, f"{name}.config")
    if folder.is_dir():
        problems += [
            f"{name} in {folder} is not one of the sonett package's code files; save into a new folder or delete it"
            for name in _python_files(folder)
            if name not in SHIPPED_CODE_FILES
        ]
    if problems:
        raise UntrustedCodeError(f"Not saving into {folder}: {'; '.join(problems)}.")


__all__ = [
    "SHIPPED_CODE_FILES",
    "UntrustedCodeError",
    "auto_map_problems",
    "check_folder",
    "check_model_folder",
    "check_saved_code",
    "check_tokenizer_folder",
    "load_model",
    "load_tokenizer",
]
