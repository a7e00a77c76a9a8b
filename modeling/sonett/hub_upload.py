"""Check a saved Sonett folder and upload it to a Hugging Face Hub repository in one commit.

`push_folder_to_hub` refuses a folder that would not load from the Hub (no config, missing or truncated weights, a
half-written file, remote-code files that `auto_map` or a relative import names but the folder lacks, no model card),
then creates the repository (and the branch for `revision`) and commits every file with `HfApi.create_commit`.
The token is resolved by huggingface_hub itself (`HF_TOKEN`, then the saved login) and never read into a log.

Only files inside the folder leave the machine: a symbolic link that points outside it is refused, and files that look
like credentials (`.env`, `token`, `.huggingface/`, SSH keys, `*.pem`, ...) are never uploaded; a warning names them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CARD_FILE = "README.md"
# Files that may carry an `auto_map` naming remote-code modules.
CODE_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Suffixes of files that a writer has not finished (Sonett's own atomic writes use `.partial`).
IN_PROGRESS_SUFFIXES = (".partial", ".tmp", ".incomplete")
# Local-only state of a training run (optimizer checkpoints, tracker logs) stays out of the upload.
IGNORED_DIRS = frozenset({".git", ".cache", "__pycache__", "checkpoints", "logs"})
IGNORED_SUFFIXES = (".pyc",)
# Files that hold credentials (matched case-insensitively on the name) and folders that hold them: never uploaded.
SECRET_FILE_PATTERNS = (
    ".env",
    ".env.*",
    "token",
    "*.token",
    ".git-credentials",
    ".netrc",
    ".pypirc",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
)
SECRET_DIRS = frozenset({".huggingface", ".ssh"})
# The first argument of `.from_pretrained("...")` in the card's usage example (training writes its local path there).
FROM_PRETRAINED_ARGUMENT = re.compile(r'(\.from_pretrained\(\s*)"[^"\n]*"')
# The relative imports transformers follows when it loads remote code.
RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+)\s*$)", re.MULTILINE)


class FolderNotReadyError(ValueError):
    """The folder is not a complete Sonett model folder; the message lists each problem and its fix."""


class NoHubTokenError(RuntimeError):
    """No Hugging Face token is available for an upload."""


@dataclass(frozen=True)
class UploadFile:
    """One file of the upload: its path in the repository, where it lies locally and its size in bytes.

    `content` is set when the upload differs from the local file (the model card, whose usage example is pointed at
    the repository).
    """

    path_in_repo: str
    local_path: Path
    size: int
    content: bytes | None = None


@dataclass
class PushResult:
    """What `push_folder_to_hub` did (or, on a dry run, would do)."""

    repo_id: str
    revision: str
    private: bool
    files: list[UploadFile] = field(default_factory=list)
    dry_run: bool = False
    commit_url: str | None = None
    commit_oid: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def format_size(num_bytes: int) -> str:
    """`512 B`, `3.4 KiB`, `6.3 MiB`, `1.2 GiB`."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size = num_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def is_secret(relative: Path) -> bool:
    """Whether a path (relative to the folder) looks like it holds credentials."""
    name = relative.name.lower()
    in_secret_dir = any(part.lower() in SECRET_DIRS for part in relative.parts[:-1])
    return in_secret_dir or any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_FILE_PATTERNS)


@dataclass
class FolderScan:
    """The files of a folder that may be uploaded, and those that must not be.

    `secrets`: credential-looking files (skipped). `outside_links`: `link -> target` for every symbolic link (or file
    reached through one) whose target lies outside the folder (a push refuses the folder).
    """

    files: list[UploadFile]
    secrets: list[str]
    outside_links: list[str]


def scan_folder(folder: str | Path) -> FolderScan:
    """Walk `folder` without leaving it: see `list_upload_files` for what is skipped."""
    root = Path(folder).resolve()
    files, secrets, outside = [], [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if IGNORED_DIRS.intersection(relative.parts[:-1]) or path.suffix in IGNORED_SUFFIXES:
            continue
        target = path.resolve()
        if not target.is_relative_to(root):  # a link (or a file under a linked folder) that leaves the folder
            if path.is_symlink() or path.is_file():
                outside.append(f"{relative.as_posix()} -> {target}")
            continue
        if not path.is_file():
            continue
        if is_secret(relative) or is_secret(target.relative_to(root)):  # a link to a secret is one too
            secrets.append(relative.as_posix())
            continue
        files.append(UploadFile(relative.as_posix(), path, path.stat().st_size))
    return FolderScan(files, secrets, outside)


def list_upload_files(folder: str | Path) -> list[UploadFile]:
    """Every file under `folder`, sorted, except `.git/`, `.cache/`, `__pycache__/`, a training run's
    `checkpoints/` and `logs/`, `*.pyc`, links that lead outside the folder, and credential-looking files (`.env`,
    `.env.*`, `token`, `*.token`, `.huggingface/`, `.ssh/`, `.git-credentials`, `.netrc`, `.pypirc`, SSH keys,
    `*.pem`, `*.key`), which a warning names."""
    scan = scan_folder(folder)
    if scan.secrets:
        logger.warning(
            "not uploading %d credential-looking files: %s (they never leave the machine; move them out of %s to "
            "silence this warning)",
            len(scan.secrets),
            ", ".join(scan.secrets),
            folder,
        )
    return scan.files


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(f"{path.name} is not valid JSON ({error}); save the model again with save_pretrained.")
        return None


def _check_safetensors(path: Path, problems: list[str]) -> None:
    """Opening parses the header and checks that the data covers it exactly, so a truncated file fails here."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as error:
        problems.append(
            f"{path.name} cannot be opened as safetensors ({error}); it is truncated or still being written. "
            "Wait for the writer to finish or save the model again."
        )


def _check_weights(folder: Path, problems: list[str]) -> None:
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, problems)
        shards = sorted(set((index or {}).get("weight_map", {}).values()))
        for shard in shards:
            if not (folder / shard).is_file():
                problems.append(
                    f"{WEIGHTS_INDEX_FILE} names the shard {shard}, which is missing; save the model again."
                )
        if index is not None and not shards:
            problems.append(f"{WEIGHTS_INDEX_FILE} has no weight_map; save the model again.")
    elif not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (found {', '.join(pickles)}: pickle weights are not uploaded)" if pickles else ""
        problems.append(
            f"No weights: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} is in the folder{found}; "
            "save the model with model.save_pretrained(folder)."
        )
    for path in sorted(folder.glob("*.safetensors")):
        _check_safetensors(path, problems)


def _auto_map_references(value: object) -> Iterator[str]:
    """Every `module.Class` string under any `auto_map` key of a (nested) JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "auto_map" and isinstance(item, dict):
                for reference in item.values():
                    for entry in reference if isinstance(reference, list) else [reference]:
                        if isinstance(entry, str):
                            yield entry
            else:
                yield from _auto_map_references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _auto_map_references(item)


def _check_remote_code(folder: Path, configs: dict[str, dict], problems: list[str]) -> None:
    """Each module an `auto_map` names must be in the folder, and so must every module those import relatively."""
    wanted: dict[str, str] = {}  # module file -> who needs it
    for name, data in configs.items():
        for reference in _auto_map_references(data):
            if "--" in reference:  # code from another repository ("owner/repo--module.Class")
                continue
            module_file = reference.rsplit(".", 1)[0] + ".py"
            wanted.setdefault(module_file, f"{name} auto_map entry {reference!r}")
    if "config.json" in configs and "auto_map" not in configs["config.json"]:
        problems.append(
            "config.json has no auto_map, so the repository cannot load with trust_remote_code=True; "
            "`import sonett` before model.save_pretrained(folder) so that the code files and auto_map are written."
        )
    seen: set[str] = set()
    pending = sorted(wanted)
    while pending:
        module_file = pending.pop()
        if module_file in seen:
            continue
        seen.add(module_file)
        path = folder / module_file
        if not path.is_file():
            problems.append(
                f"{module_file} is missing but {wanted[module_file]} needs it; save the model with "
                "save_pretrained after `import sonett` (it copies the code files) or copy the file from the package."
            )
            continue
        for match in RELATIVE_IMPORT.finditer(path.read_text(encoding="utf-8")):
            imported = (match.group(1) or match.group(2)) + ".py"
            wanted.setdefault(imported, f"{module_file} (it imports .{imported[:-3]})")
            pending.append(imported)


def card_for_repo(card: str, repo_id: str) -> str:
    """The card with every `.from_pretrained("...")` of its usage example loading `repo_id`."""
    return FROM_PRETRAINED_ARGUMENT.sub(lambda match: f'{match.group(1)}"{repo_id}"', card)


def _point_card_at(files: list[UploadFile], repo_id: str) -> list[UploadFile]:
    """The upload list with README.md replaced by its repo-pointed text when that differs from the local file."""
    updated = []
    for f in files:
        if f.path_in_repo == CARD_FILE:
            card = f.local_path.read_text(encoding="utf-8")
            pointed = card_for_repo(card, repo_id)
            if pointed != card:
                logger.info("%s: the usage example now loads %s", CARD_FILE, repo_id)
                data = pointed.encode("utf-8")
                f = UploadFile(f.path_in_repo, f.local_path, len(data), content=data)
        updated.append(f)
    return updated


def validate_model_folder(folder: str | Path) -> list[UploadFile]:
    """Check that `folder` is a complete, finished Sonett model folder and return the files to upload.

    Raises:
        FolderNotReadyError: naming every problem found (half-written files, config, weights, remote code, card)
            and how to fix it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderNotReadyError(f"{folder} is not a folder; pass the directory that save_pretrained wrote.")
    files = list_upload_files(folder)
    problems: list[str] = []
    outside = scan_folder(folder).outside_links
    if outside:
        problems.append(
            f"Symbolic links lead outside the folder: {', '.join(outside)}; files outside the folder are never "
            "uploaded. Copy the file into the folder instead (cp -L), or remove the link."
        )
    unfinished = [f.path_in_repo for f in files if f.path_in_repo.endswith(IN_PROGRESS_SUFFIXES)]
    if unfinished:
        problems.append(
            f"The folder is half-written: {', '.join(unfinished)} "
            f"(files ending in {', '.join(IN_PROGRESS_SUFFIXES)} are unfinished writes); wait for the writer "
            "(training or save) to finish, or delete them and save the model again."
        )
    configs = {}
    for name in CODE_CONFIG_FILES:
        if (folder / name).is_file():
            data = _read_json(folder / name, problems)
            if data is not None:
                configs[name] = data
    if not (folder / "config.json").is_file():
        problems.append("config.json is missing; save the model with model.save_pretrained(folder).")
    _check_weights(folder, problems)
    _check_remote_code(folder, configs, problems)
    card = folder / CARD_FILE
    if not card.is_file() or not card.read_text(encoding="utf-8").strip():
        problems.append(
            f"No model card: {CARD_FILE} is missing or empty; write the folder with sonett.hub.write_model_folder "
            "or write README.md with sonett.model_card.render_model_card."
        )
    if problems:
        raise FolderNotReadyError(f"Cannot upload {folder}:\n" + "\n".join(f"- {p}" for p in problems))
    return files


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> PushResult:
    """Validate `folder`, create `repo_id` (and the branch `revision` if it is missing) and upload every file.

    The model card is uploaded with its usage example's `from_pretrained("...")` pointed at the repository (training
    writes the local folder path there); the local README.md is left unchanged.

    Args:
        folder: a saved Sonett folder (weights, config, remote code, tokenizer/processor, README.md, results).
        repo_id: `owner/name`, or `name` for the token owner's namespace.
        private: create the repository private. An existing public repository is refused rather than silently
            receiving a model meant to be private.
        revision: the branch to commit to (created from main if missing); main by default.
        commit_message: the commit title; `Upload <folder name>` by default.
        dry_run: validate and list the files only; no token needed and no network request made.
        api: the client (a default `HfApi()` uses `HF_ENDPOINT` and the usual token resolution).

    Returns:
        A `PushResult` with the files and, unless `dry_run`, the commit URL and id.
    """
    folder = Path(folder)
    files = validate_model_folder(folder)
    branch = revision or DEFAULT_BRANCH
    result = PushResult(repo_id, branch, private, _point_card_at(files, repo_id), dry_run=dry_run)
    if dry_run:
        logger.info(
            "dry run: %d files, %s, would go to %s@%s", len(files), format_size(result.total_bytes), repo_id, branch
        )
        return result
    if get_token() is None:
        raise NoHubTokenError(
            "No Hugging Face token found: set the HF_TOKEN environment variable or run `hf auth login` first."
        )
    api = api or HfApi()
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    result.repo_id = repo_url.repo_id
    if private and not api.model_info(result.repo_id).private:
        raise ValueError(
            f"{result.repo_id} already exists and is public, so --private would not keep this model private; "
            "make it private first (HfApi().update_repo_settings(repo_id, private=True)) or drop --private."
        )
    if branch != DEFAULT_BRANCH:
        api.create_branch(result.repo_id, branch=branch, exist_ok=True)
    result.files = _point_card_at(files, result.repo_id)  # `name` may have become `owner/name`
    operations = [
        CommitOperationAdd(
            path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local_path) if f.content is None else f.content
        )
        for f in result.files
    ]
    commit = api.create_commit(
        result.repo_id,
        operations,
        commit_message=commit_message or f"Upload {folder.resolve().name}",
        revision=branch,
    )
    result.commit_url, result.commit_oid = commit.commit_url, commit.oid
    logger.info(
        "pushed %s (%d files; the client skips those the branch already holds) to %s@%s: %s",
        folder,
        len(result.files),
        result.repo_id,
        branch,
        commit.commit_url,
    )
    return result


__all__ = [
    "FolderNotReadyError",
    "FolderScan",
    "NoHubTokenError",
    "PushResult",
    "UploadFile",
    "card_for_repo",
    "format_size",
    "list_upload_files",
    "push_folder_to_hub",
    "scan_folder",
    "validate_model_folder",
]
