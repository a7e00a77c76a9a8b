"""Check a saved Sonett folder and upload it to a Hugging Face Hub repository in one commit.

`push_folder_to_hub` takes any folder `save_pretrained` writes (a text or vision model with its tokenizer or
processor, a merged fine-tune, a PEFT adapter) and refuses one that would not load from the Hub (no config, missing or
truncated weights, a half-written file, remote-code files that `auto_map` or a relative import names but the folder
lacks, an adapter whose base model has no Hub id). A folder without a card (or with PEFT's unfilled placeholder)
uploads a card generated from its config (`sonett.hub.folder_card`); the local folder is left as it is. It then
creates the repository (and the branch for `revision`) and commits every file with `HfApi.create_commit`.
The token is resolved by huggingface_hub itself (`HF_TOKEN`, then the saved login) and never read into a log.

Only what a model folder holds leaves the machine, and every problem is refused by name before any request:
- an allow-list, not a deny-list: weights, configs, tokenizer files, the sonett package's own `*_sonett.py` files
  (byte for byte as installed, unless `allow_modified_code`), the card, results and plots. Any other file is refused
  unless an `allow_extra_files` pattern names it; files that hold credentials and foreign `.py` files never upload;
- symbolic links that leave the folder (or lead to a file that is not uploaded) and hard links are refused;
- every uploaded text file is scanned, streaming, for token patterns (Hugging Face, AWS, GitHub, OpenAI-style,
  private keys, ...); a hit is refused naming the file and line, never printing the secret;
- absolute local paths (`/home/...`, `/work/...`) in the card and the results files are made relative in the
  upload; one in any other uploaded text file is refused naming the file and line.
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from safetensors import SafetensorError, safe_open

from sonett.hub.folder_card import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CardError,
    adapter_base_model,
    folder_model_card,
    is_adapter_folder,
    is_placeholder_card,
)
from sonett.hub.model_card import is_hub_id

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CARD_FILE = "README.md"
# Files that may carry an `auto_map` naming remote-code modules.
CODE_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Suffixes of files that a writer has not finished (Sonett's own atomic writes use `.partial`).
IN_PROGRESS_SUFFIXES = (".partial", ".tmp", ".incomplete")
# Local-only state of a training run (optimizer checkpoints, tracker logs) stays out of the upload, unlisted.
IGNORED_DIRS = frozenset({".git", ".cache", "__pycache__", "checkpoints", "logs"})
IGNORED_SUFFIXES = (".pyc",)
# What `sonett finetune` writes beside an adapter: the Trainer's pickled arguments (local state, and a pickle) and,
# with --merge, `merged/`, a model folder of its own that is pushed on its own.
IGNORED_TOP_LEVEL = frozenset({"training_args.bin", "merged"})
# What a model folder holds: patterns on the path inside the folder (top level, then any folder depth).
ALLOWED_TOP_LEVEL = (
    # weights
    "*.safetensors",
    WEIGHTS_INDEX_FILE,
    # configs and chat templates
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "adapter_config.json",  # a PEFT adapter folder (its weights: adapter_model.safetensors)
    "chat_template.jinja",
    "chat_template.json",
    # tokenizer
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "*.tiktoken",
    # card, results, plots
    CARD_FILE,
    ".gitattributes",
    "results.json",
    "*_results.json",
    "*.png",
    "*.svg",
    "*.jpg",
    "*.jpeg",
)
ALLOWED_NESTED = (
    "additional_chat_templates/*.jinja",
    *(f"{folder}/*.{ext}" for folder in ("plots", "docs", "images", "assets") for ext in ("png", "svg", "jpg", "jpeg")),
)
# The card and results files whose absolute local paths the upload rewrites (other files are refused).
RESULTS_PATTERNS = ("results.json", "*_results.json")
# Files whose text is data rather than prose (a vocabulary may hold any string): no local-path check.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "*.tiktoken")
# Files read in binary: not scanned for token patterns (a weights file is a header and raw numbers), except the
# JSON header of a safetensors file, whose `__metadata__` holds free text.
BINARY_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".model")
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors refuses a header over 100 MB; a longer declared length is read only this far.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# The shipped model's folder: its files are exactly the code save_pretrained copies into a model folder (the only
# `.py` files that upload).
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "model"
# Names of files and folders that hold credentials (matched case-insensitively): refused, and no pattern admits them.
CREDENTIAL_FILE_PATTERNS = (
    ".env",
    ".env.*",
    ".envrc",
    "token",
    "token.*",
    "tokens.*",
    "*_token",
    "*_token.*",
    "*-token.*",
    "*.token",
    "*credentials*",
    "service_account*",
    "*service-account*",
    "client_secret*",
    "kaggle.json",
    ".git-credentials",
    ".netrc",
    "_netrc",
    ".npmrc",
    ".pypirc",
    ".pgpass",
    ".boto",
    ".s3cfg",
    ".htpasswd",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    # names that say "secret" without a fixed spelling, shell histories (tokens typed on a command line), tool state
    "*secret*",
    "*password*",
    "*passwd*",
    "*api_key*",
    "*apikey*",
    "*_history",
    ".vault-token",
    ".dockercfg",
    "*.tfstate",
    "*.tfstate.*",
    "cookies.txt",
)
CREDENTIAL_DIRS = frozenset(
    {".aws", ".azure", ".config", ".docker", ".env", ".gcloud", ".gnupg", ".huggingface", ".kaggle", ".kube", ".ssh"}
)
# Token patterns looked for in every uploaded text file: (what it is, pattern). Each pattern starts with a literal, so
# that `re` skips to candidates quickly (about 30 ms per MB each); a hit must not follow a letter, digit, `_` or `-`.
SECRET_PATTERNS = (
    ("a Hugging Face token", rb"hf_[A-Za-z0-9]{30,}"),
    ("an AWS access key id", rb"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ("a private key", rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"),
    ("a GitHub token", rb"gh[pousr]_[A-Za-z0-9]{36,}"),
    ("a GitHub token", rb"github_pat_[A-Za-z0-9_]{22,}"),
    ("an OpenAI-style secret key", rb"sk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{32,}"),
    ("a GitLab token", rb"glpat-[A-Za-z0-9_-]{20,}"),
    ("a Google API key", rb"AIza[A-Za-z0-9_-]{35}"),
    ("a Slack token", rb"xox[abprs]-[A-Za-z0-9-]{10,}"),
    ("a Stripe secret key", rb"(?:sk|rk)_live_[A-Za-z0-9]{24,}"),
    ("a PyPI token", rb"pypi-AgE[A-Za-z0-9_-]{50,}"),
    ("an npm token", rb"npm_[A-Za-z0-9]{36}"),
    ("a password in a URL", rb"://[^\s/:@\"'<>]+:[^\s/@\"'<>]+@"),
)
SECRET_SEARCHES = tuple((label, re.compile(pattern)) for label, pattern in SECRET_PATTERNS)
TOKEN_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# Text files are read in chunks of this size; a match may straddle two chunks by up to SCAN_OVERLAP_BYTES.
SCAN_CHUNK_BYTES = 1 << 20
SCAN_OVERLAP_BYTES = 1024
# An absolute POSIX path inside text (a run of path characters after a `/` that no word, `.` or `:` precedes, or
# after `file://`: a file URL names a local path too).
ABSOLUTE_PATH = r"(?:(?<=file://)|(?<![\w.~/:-]))/[\w.@+~-]+(?:/[\w.@+~-]+)*"
ABSOLUTE_PATH_TEXT = re.compile(ABSOLUTE_PATH)
ABSOLUTE_PATH_BYTES = re.compile(ABSOLUTE_PATH.encode())
# Top-level folders that hold a user's files on common systems (a path under one is local even if it is not here)
# and system folders that say nothing about the user (a path under one is left alone).
USER_ROOTS = frozenset(
    {"home", "Users", "root", "work", "workspace", "tmp", "var", "private", "mnt", "media", "scratch", "data", "srv"}
    | {"opt", "Volumes", "content", "kaggle", "gpfs", "lustre", "nfs", "net", "storage", "shared", "projects"}
)
SYSTEM_ROOTS = frozenset({"usr", "bin", "sbin", "etc", "dev", "proc", "sys", "lib", "lib32", "lib64", "boot", "run"})
# At most this many names per problem line.
MAX_LISTED = 20
# The first argument of `.from_pretrained("...")` in the card's usage example (training writes its local path there),
# and the repository argument of an adapter card's `PeftModel.from_pretrained(base, "...")`.
FROM_PRETRAINED_ARGUMENT = re.compile(r'(\.from_pretrained\(\s*(?:base,\s*)?)"[^"\n]*"')
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
    the repository; the card and results files, whose absolute local paths are made relative); `changes` says how.
    """

    path_in_repo: str
    local_path: Path
    size: int
    content: bytes | None = None
    changes: tuple[str, ...] = ()


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
    """Whether a path (relative to the folder) looks like it holds credentials: its name, or a folder it lies in."""
    name = relative.name.lower()
    in_secret_dir = any(part.lower() in CREDENTIAL_DIRS for part in relative.parts[:-1])
    return in_secret_dir or any(fnmatch.fnmatchcase(name, pattern) for pattern in CREDENTIAL_FILE_PATTERNS)


def package_code_files() -> dict[str, Path]:
    """The code files save_pretrained copies into a Sonett folder: name -> the installed package's copy."""
    return {path.name: path for path in sorted(PACKAGE_DIR.glob("*.py"))}


def is_allowed(path_in_repo: str) -> bool:
    """Whether a path inside the folder is one a model folder holds (code files are checked by `scan_folder`)."""
    patterns = ALLOWED_NESTED if "/" in path_in_repo else ALLOWED_TOP_LEVEL
    return any(fnmatch.fnmatchcase(path_in_repo, pattern) for pattern in patterns)


def _matches(path_in_repo: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path_in_repo, pattern) for pattern in patterns)


@dataclass
class FolderScan:
    """What a walk of a folder found, each list sorted by path.

    `files`: the upload (allow-listed files, the package's code files, files an `allow_extra_files` pattern admits).
    Refused: `secrets` (credential files), `extras` (not allow-listed), `foreign_code` (`.py` files the package does
    not ship), `modified_code` (package code files that differ from the installed copy), `hard_links`,
    `outside_links` and `hidden_links` (`link -> target` for links that leave the folder or lead to a file that is not
    uploaded), `unfinished` (`.partial`, `.tmp`, `.incomplete`).
    """

    files: list[UploadFile] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    foreign_code: list[str] = field(default_factory=list)
    modified_code: list[str] = field(default_factory=list)
    hard_links: list[str] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)
    hidden_links: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


def _kind(relative: str, allow_extra_files: Sequence[str], code: dict[str, Path]) -> str:
    """`unfinished`, `secret`, `code`, `foreign_code`, `allowed` or `extra` for a path inside the folder."""
    if relative.endswith(IN_PROGRESS_SUFFIXES):
        return "unfinished"
    if relative.endswith(".py"):
        return "code" if relative in code else "foreign_code"
    if is_allowed(relative):
        return "allowed"
    if is_secret(Path(relative)):
        return "secret"
    return "allowed" if _matches(relative, allow_extra_files) else "extra"


def scan_folder(
    folder: str | Path, allow_extra_files: Sequence[str] = (), allow_modified_code: bool = False
) -> FolderScan:
    """Walk `folder` without leaving it and sort every file into what uploads and what is refused (`FolderScan`).

    `.git/`, `.cache/`, `__pycache__/`, a training run's `checkpoints/` and `logs/`, `*.pyc`, and a fine-tune's
    top-level `training_args.bin` and `merged/` are local state or another folder: left out and not reported.
    `allow_extra_files`: glob patterns (`fnmatch`, on the path inside the folder, `/`-separated) that admit files the
    allow-list lacks; they never admit credential files or `.py` files.
    """
    root = Path(folder).resolve()
    code = package_code_files()
    scan = FolderScan()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        name = relative.as_posix()
        if IGNORED_DIRS.intersection(relative.parts[:-1]) or path.suffix in IGNORED_SUFFIXES:
            continue
        if relative.parts[0] in IGNORED_TOP_LEVEL:
            continue
        target = path.resolve()
        if not target.is_relative_to(root):  # a link (or a file under a linked folder) that leaves the folder
            if path.is_symlink() or path.is_file():
                scan.outside_links.append(f"{name} -> {target}")
            continue
        if not path.is_file():
            continue
        kind = _kind(name, allow_extra_files, code)
        if target != path:  # a link inside the folder: its target must be a file that uploads too
            target_relative = target.relative_to(root)
            hidden = IGNORED_DIRS.intersection(target_relative.parts[:-1])
            target_kind = _kind(target_relative.as_posix(), allow_extra_files, code)
            if kind in ("allowed", "code") and (hidden or target_kind not in ("allowed", "code")):
                scan.hidden_links.append(f"{name} -> {target_relative.as_posix()}")
                continue
        if kind == "unfinished":
            scan.unfinished.append(name)
        elif kind == "secret":
            scan.secrets.append(name)
        elif kind == "extra":
            scan.extras.append(name)
        elif kind == "foreign_code":
            scan.foreign_code.append(name)
        else:
            status = path.stat()
            if status.st_nlink > 1:
                scan.hard_links.append(name)
                continue
            if kind == "code" and not allow_modified_code and not filecmp.cmp(path, code[name], shallow=False):
                scan.modified_code.append(name)
            scan.files.append(UploadFile(name, path, status.st_size))
    return scan


def list_upload_files(
    folder: str | Path, allow_extra_files: Sequence[str] = (), allow_modified_code: bool = False
) -> list[UploadFile]:
    """The files of `folder` that a push uploads, sorted: those a model folder holds (weights, configs, tokenizer,
    the package's code files, README.md, results, plots) and those an `allow_extra_files` pattern admits. A push
    refuses the folder when anything else is there (see `validate_model_folder`)."""
    return scan_folder(folder, allow_extra_files, allow_modified_code).files


# ---- absolute local paths -------------------------------------------------------------------------------------------


def is_local_path(path: str) -> bool:
    """Whether an absolute POSIX path names a place on someone's machine: its top folder is a user's (`/home`,
    `/Users`, `/work`, `/tmp`, ...) or exists here and is not a system folder (`/usr`, `/etc`, ...).
    `/v1/chat/completions` is not one."""
    top = path.split("/")[1] if path.startswith("/") and len(path) > 1 else ""
    if not top or top in SYSTEM_ROOTS:
        return False
    return top in USER_ROOTS or os.path.isdir("/" + top)


def _relative_path(path: str, folder: Path, cwd: Path) -> str:
    """`path` relative to the working directory (the repository a command ran in), else to the model folder, else
    its file name alone."""
    absolute = Path(os.path.normpath(path))
    for base in (cwd, folder, folder.resolve()):
        if (base is not cwd or len(base.parts) > 2) and absolute.is_relative_to(base):  # not relative to `/` or `/tmp`
            return absolute.relative_to(base).as_posix()
    return absolute.name or "."


def relative_local_paths(value: object, folder: str | Path, cwd: str | Path | None = None) -> object:
    """A copy of a JSON-like value (dict, list, str, ...) with every absolute local path in its strings made relative.

    A string that is one path (the whole string, or a path that exists) is rewritten as a whole; paths inside longer
    text (`train.txt, /home/a/b.txt`, a command line) are rewritten one by one. A path becomes relative to `cwd`
    (the working directory by default: the repository the command ran in), else to `folder`, else it keeps only its
    file name. Paths that are not local (`/v1/chat/completions`, `/usr/bin/env`) and dict keys are left as they are.
    """
    folder = Path(folder).absolute()
    cwd = Path(cwd).absolute() if cwd is not None else Path.cwd()

    def path_in_text(match: re.Match) -> str:
        text = match.group(0)
        path = text.rstrip(".")  # a sentence's full stop is not part of the path
        if not is_local_path(path):
            return text
        return _relative_path(path, folder, cwd) + text[len(path) :]

    def convert(item: object) -> object:
        if isinstance(item, dict):
            return {key: convert(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(convert(inner) for inner in item)
        one_path = isinstance(item, str) and item.startswith("/") and "\n" not in item and is_local_path(item)
        if one_path and (os.path.exists(item) or not any(character.isspace() for character in item)):
            return _relative_path(item, folder, cwd)
        if isinstance(item, str) and "/" in item:
            return ABSOLUTE_PATH_TEXT.sub(path_in_text, item)
        return item

    return convert(value)


# ---- reading what would be uploaded ---------------------------------------------------------------------------------


def _chunks(upload: UploadFile) -> Iterator[bytes]:
    """The bytes that would be uploaded, `SCAN_CHUNK_BYTES` at a time (of a safetensors file: its JSON header)."""
    if upload.path_in_repo.endswith(SAFETENSORS_SUFFIX) and upload.content is None:
        with upload.local_path.open("rb") as handle:
            length = min(int.from_bytes(handle.read(8), "little"), MAX_SAFETENSORS_HEADER_BYTES)
            while length > 0 and (chunk := handle.read(min(length, SCAN_CHUNK_BYTES))):
                length -= len(chunk)
                yield chunk
        return
    if upload.content is not None:
        for start in range(0, len(upload.content), SCAN_CHUNK_BYTES):
            yield upload.content[start : start + SCAN_CHUNK_BYTES]
        return
    with upload.local_path.open("rb") as handle:
        while chunk := handle.read(SCAN_CHUNK_BYTES):
            yield chunk


def find_in_stream(
    chunks: Iterable[bytes], pattern: re.Pattern[bytes], keep: Callable[[re.Match[bytes]], bool] = lambda m: True
) -> Iterator[tuple[int, re.Match[bytes]]]:
    """(line number, match) for each match of `pattern` in a stream of chunks, in memory bounded by the chunk size.

    The last `SCAN_OVERLAP_BYTES` of each buffer are carried into the next one, and a match is reported only from
    the buffer in which it starts before that carried part (or from the last buffer), so a match that straddles two
    chunks is found, and found once.
    """
    lines_before, tail = 1, b""
    iterator = iter(chunks)
    chunk = next(iterator, None)
    while chunk is not None:
        following = next(iterator, None)
        buffer = tail + chunk
        report_until = len(buffer) if following is None else max(len(buffer) - SCAN_OVERLAP_BYTES, 0)
        for match in pattern.finditer(buffer):
            if match.start() >= report_until:
                break
            if keep(match):
                yield lines_before + buffer.count(b"\n", 0, match.start()), match
        lines_before += buffer.count(b"\n", 0, report_until)
        tail, chunk = buffer[report_until:], following


def _mask(secret: bytes) -> str:
    """The first 6 characters of a secret and its length: enough to find it, not enough to use it."""
    text = secret.decode("utf-8", "replace")
    return f"{text[:6]}… {len(text)} characters"


def _starts_a_token(match: re.Match[bytes]) -> bool:
    """Whether a match is not the tail of a longer word (`mask-...` is not an `sk-` key)."""
    start = match.start()
    return match.group(0).startswith(b"://") or start == 0 or match.string[start - 1] not in TOKEN_CHARACTERS


def find_secrets(upload: UploadFile) -> list[str]:
    """`<file> line <n>: <what> (<first characters>… <length> characters)` for each token pattern in a file, by line.

    Raster images and tensor data are not read; the header of a safetensors file (its `__metadata__` is free text)
    and every other uploaded file are, `SCAN_CHUNK_BYTES` at a time.
    """
    name = upload.path_in_repo
    if name.endswith(BINARY_SUFFIXES) and not name.endswith(SAFETENSORS_SUFFIX):
        return []
    found = []
    for label, pattern in SECRET_SEARCHES:
        for line, match in find_in_stream(_chunks(upload), pattern, _starts_a_token):
            found.append((line, f"{upload.path_in_repo} line {line}: {label} ({_mask(match.group(0))})"))
    return [text for _, text in sorted(found)]


def find_local_paths(upload: UploadFile) -> list[str]:
    """`<file> line <n>: an absolute local path (<path>)` for each in a text file or a safetensors header
    (vocabularies and the package's code files are not checked)."""
    name = upload.path_in_repo
    binary = name.endswith(BINARY_SUFFIXES) and not name.endswith(SAFETENSORS_SUFFIX)
    if binary or name.endswith(".py") or _matches(name, VOCABULARY_FILES):
        return []
    local = lambda match: is_local_path(match.group(0).decode("utf-8", "replace").rstrip("."))  # noqa: E731
    return [
        f"{name} line {line}: an absolute local path ({match.group(0).decode('utf-8', 'replace').rstrip('.')})"
        for line, match in find_in_stream(_chunks(upload), ABSOLUTE_PATH_BYTES, local)
    ]


def _relative_upload(upload: UploadFile, folder: Path) -> UploadFile:
    """The card or a results file with its absolute local paths made relative (unchanged if it has none)."""
    name = upload.path_in_repo
    if name != CARD_FILE and not _matches(name, RESULTS_PATTERNS):
        return upload
    original = upload.content if upload.content is not None else upload.local_path.read_bytes()
    try:
        text = original.decode("utf-8")
        if name == CARD_FILE:
            rewritten = relative_local_paths(text, folder)
        else:
            value = json.loads(text)
            converted = relative_local_paths(value, folder)
            rewritten = text if converted == value else json.dumps(converted, indent=2, ensure_ascii=False) + "\n"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return upload  # left to the local-path check, which refuses what remains
    if rewritten == text:
        return upload
    logger.info("%s: absolute local paths made relative in the upload", name)
    data = rewritten.encode("utf-8")
    return UploadFile(name, upload.local_path, len(data), data, (*upload.changes, "local paths made relative"))


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


def _scan_problems(scan: FolderScan) -> list[str]:
    """One line (the problem, then the fix) per kind of refused file."""
    problems = []
    if scan.outside_links:
        problems.append(
            f"Symbolic links lead outside the folder: {_listed(scan.outside_links)}; files outside the folder are "
            "never uploaded. Copy the file into the folder instead (cp -L), or remove the link."
        )
    if scan.hidden_links:
        problems.append(
            f"Symbolic links lead to files that are not uploaded: {_listed(scan.hidden_links)}; remove the link, or "
            "replace it with a copy of the file it should show."
        )
    if scan.hard_links:
        verb = "is a hard link" if len(scan.hard_links) == 1 else "are hard links"
        problems.append(
            f"{_listed(scan.hard_links)} {verb}: the same data as another path, possibly outside the folder, that "
            "the upload would publish. Give each its own copy: cp FILE FILE.copy && mv FILE.copy FILE."
        )
    if scan.secrets:
        problems.append(
            f"Files that hold credentials are in the folder: {_listed(scan.secrets)}; they are never uploaded, "
            "whatever --allow_extra_files says. Move them out of the folder (and revoke any that may have leaked)."
        )
    if scan.foreign_code:
        problems.append(
            f"Python files that are not one of the sonett package's code files: {_listed(scan.foreign_code)}; "
            "everyone who loads the repository with trust_remote_code=True could run them, so no pattern admits "
            "them. Delete them; save_pretrained (after `import sonett`) writes the code the model needs."
        )
    if scan.modified_code:
        verb = "differs" if len(scan.modified_code) == 1 else "differ"
        problems.append(
            f"{_listed(scan.modified_code)} {verb} from the installed sonett package's copy ({PACKAGE_DIR}); "
            "everyone who loads the repository with trust_remote_code=True runs this code. Save the model again "
            "after `import sonett` to ship the installed code, or pass --allow_modified_code "
            "(allow_modified_code=True) if you changed it on purpose and have read the diff."
        )
    if scan.extras:
        problems.append(
            f"Files that a model folder does not hold: {_listed(scan.extras)}. Only weights, configs, tokenizer "
            "files, the sonett code files, the card (README.md), results (results.json, *_results.json) and plots "
            "are uploaded. Move them out of the folder, or name each one you mean to publish with "
            "--allow_extra_files PATTERN (allow_extra_files= in Python)."
        )
    if scan.unfinished:
        problems.append(
            f"The folder is half-written: {_listed(scan.unfinished)} "
            f"(files ending in {', '.join(IN_PROGRESS_SUFFIXES)} are unfinished writes); wait for the writer "
            "(training or save) to finish, or delete them and save the model again."
        )
    return problems


def _content_problems(files: list[UploadFile]) -> list[str]:
    """Token patterns and absolute local paths in what would be uploaded."""
    secrets = [hit for upload in files for hit in find_secrets(upload)]
    paths = [hit for upload in files for hit in find_local_paths(upload)]
    problems = []
    if secrets:
        problems.append(
            f"Secrets in files that would be uploaded: {'; '.join(secrets[:MAX_LISTED])}. Remove them from the "
            "files (and revoke any real credential that was written there)."
        )
    if paths:
        problems.append(
            f"Absolute local paths in files that would be uploaded: {'; '.join(paths[:MAX_LISTED])}. Make them "
            "relative to the folder or remove them (the card and results files are made relative automatically)."
        )
    return problems


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
        shards = sorted(set(map(str, (index or {}).get("weight_map", {}).values())))
        for shard in shards:
            if Path(shard).name != shard or shard in ("", ".", ".."):
                problems.append(
                    f"{WEIGHTS_INDEX_FILE} names the shard {shard}, which is not a file name in the folder (only the "
                    "folder's own files are uploaded, so the repository would lack it); save the model again."
                )
            elif not (folder / shard).is_file():
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
            card = (f.content or f.local_path.read_bytes()).decode("utf-8")
            pointed = card_for_repo(card, repo_id)
            if pointed != card:
                logger.info("%s: the usage example now loads %s", CARD_FILE, repo_id)
                data = pointed.encode("utf-8")
                changes = (*f.changes, f"usage example loads {repo_id}")
                f = UploadFile(f.path_in_repo, f.local_path, len(data), data, changes)
        updated.append(f)
    return updated


def _check_adapter(folder: Path, problems: list[str]) -> dict | None:
    """A PEFT adapter folder's config and weights; returns the adapter config (None if unreadable)."""
    adapter_config = _read_json(folder / ADAPTER_CONFIG_FILE, problems)
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (found {', '.join(pickles)}: pickle weights are not uploaded)" if pickles else ""
        problems.append(
            f"No adapter weights: {ADAPTER_WEIGHTS_FILE} is missing{found}; save the adapter with "
            "peft_model.save_pretrained(folder)."
        )
    for path in sorted(folder.glob("*.safetensors")):
        _check_safetensors(path, problems)
    return adapter_config


def _replaced(files: list[UploadFile], upload: UploadFile) -> list[UploadFile]:
    """`files` with `upload` in place of the file of the same path (added if there is none), sorted by path."""
    kept = [f for f in files if f.path_in_repo != upload.path_in_repo]
    return sorted([*kept, upload], key=lambda f: f.path_in_repo)


def _adapter_config_naming(files: list[UploadFile], adapter_config: dict, base_model: str) -> list[UploadFile]:
    """The upload with adapter_config.json naming its base by `base_model` (not by a local path)."""
    if adapter_config.get("base_model_name_or_path") == base_model:
        return files
    local = next(f for f in files if f.path_in_repo == ADAPTER_CONFIG_FILE).local_path
    data = (
        json.dumps({**adapter_config, "base_model_name_or_path": base_model}, indent=2, sort_keys=True) + "\n"
    ).encode()
    change = f"base_model_name_or_path: {base_model}"
    return _replaced(files, UploadFile(ADAPTER_CONFIG_FILE, local, len(data), data, (change,)))


def _card_naming_hub_base(text: str, base_model: str | None) -> tuple[str, str | None]:
    """A card whose metadata `base_model` names local paths, rewritten to `base_model` (PEFT's
    `base_model:adapter:<path>` tags go too); (text, what changed or None).

    Raises:
        CardError: the card names a local base and `base_model` is None.
    """
    card = ModelCard(text, ignore_metadata_errors=True)
    named = card.data.base_model
    local = [name for name in ([named] if isinstance(named, str) else named or []) if not is_hub_id(name)]
    if not local:
        return text, None
    if base_model is None:
        raise CardError(
            f"{CARD_FILE}'s metadata names its base model by a local path ({', '.join(map(str, local))}), which "
            "the Hub cannot resolve and the card must not publish; pass --base_model OWNER/NAME (base_model= in "
            "Python), the Hub repository of the base model."
        )
    card.data.base_model = base_model
    if card.data.tags:
        card.data.tags = [tag for tag in card.data.tags if not any(str(tag).endswith(f":{n}") for n in local)]
    return str(card), f"base_model: {base_model}"


def _with_card(
    folder: Path, files: list[UploadFile], repo_id: str | None, base_model: str | None, problems: list[str]
) -> list[UploadFile]:
    """The upload with its card: the folder's own (metadata `base_model` checked), or one generated from the config
    when the folder has none or only PEFT's unfilled placeholder."""
    path = folder / CARD_FILE
    own = next((f for f in files if f.path_in_repo == CARD_FILE), None)
    text = path.read_text(encoding="utf-8") if own is not None else ""
    if own is not None and not is_placeholder_card(text):
        try:
            fixed, change = _card_naming_hub_base(text, base_model)
        except CardError as error:
            problems.append(str(error))
            return files
        if change is None:
            return files
        data = fixed.encode("utf-8")
        return _replaced(files, UploadFile(CARD_FILE, path, len(data), data, (*own.changes, change)))
    missing = "is missing" if own is None else "is a placeholder (huggingface_hub's unfilled template)"
    try:
        card = folder_model_card(folder, repo_id, base_model)
    except CardError as error:
        problems.append(f"No model card: {CARD_FILE} {missing}, and none can be generated: {error}")
        return files
    data = card.encode("utf-8")
    change = "generated from the config" if own is None else "generated from the config, replacing the placeholder"
    return _replaced(files, UploadFile(CARD_FILE, path, len(data), data, (change,)))


def validate_model_folder(
    folder: str | Path,
    allow_extra_files: Sequence[str] = (),
    allow_modified_code: bool = False,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
) -> list[UploadFile]:
    """Check that `folder` is a complete, finished Sonett model folder (or PEFT adapter folder) that holds nothing
    else, and return the files to upload: with a generated card when it has none (`sonett.hub.folder_card`), an
    adapter config naming its base by Hub id, and the card and results files with their absolute local paths made
    relative (see `relative_local_paths`).

    Args:
        folder: the folder save_pretrained (or training) wrote.
        allow_extra_files: glob patterns on paths inside the folder (`notes.md`, `extra/*`) that admit files the
            allow-list lacks; never credential files or `.py` files.
        allow_modified_code: upload package code files that differ from the installed package's copy.
        repo_id: the repository it goes to (a generated card's title and usage example).
        base_model: the Hub id of the base model: needed for an adapter (or a card) that names its base by a local
            path; fills a generated card's `base_model` metadata.

    Raises:
        FolderNotReadyError: naming every problem found (files that are not uploaded, links, secrets and local paths
            in the text, half-written files, config, weights, remote code, base model, card) and how to fix it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderNotReadyError(f"{folder} is not a folder; pass the directory that save_pretrained wrote.")
    scan = scan_folder(folder, allow_extra_files, allow_modified_code)
    files = scan.files
    problems = _scan_problems(scan)
    configs = {}
    for name in CODE_CONFIG_FILES:
        if (folder / name).is_file():
            data = _read_json(folder / name, problems)
            if data is not None:
                configs[name] = data
    base = None
    if is_adapter_folder(folder):
        adapter_config = _check_adapter(folder, problems)
        if adapter_config is not None:
            try:
                base = adapter_base_model(adapter_config, base_model)
                files = _adapter_config_naming(files, adapter_config, base)
            except CardError as error:
                problems.append(str(error))
    else:
        if base_model is not None and not is_hub_id(base_model):
            problems.append(f"--base_model {base_model!r} is not a Hub repository id; give OWNER/NAME.")
        else:
            base = base_model
        if not (folder / "config.json").is_file():
            problems.append("config.json is missing; save the model with model.save_pretrained(folder).")
        _check_weights(folder, problems)
    _check_remote_code(folder, configs, problems)
    if base is not None or not is_adapter_folder(folder):  # an adapter without a Hub base is refused above
        files = _with_card(folder, files, repo_id, base, problems)
    files = [_relative_upload(f, folder) for f in files]
    problems += _content_problems(files)
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
    allow_extra_files: Sequence[str] = (),
    allow_modified_code: bool = False,
    base_model: str | None = None,
) -> PushResult:
    """Validate `folder`, create `repo_id` (and the branch `revision` if it is missing) and upload its files.

    The model card is uploaded with its usage example's `from_pretrained("...")` pointed at the repository (training
    writes the local folder path there); the local README.md is left unchanged.

    Args:
        folder: a saved Sonett folder (weights, config, remote code, tokenizer/processor, README.md, results) or a
            PEFT adapter folder (adapter_config.json, adapter_model.safetensors); a missing card is generated.
        repo_id: `owner/name`, or `name` for the token owner's namespace.
        private: create the repository private. An existing public repository is refused rather than silently
            receiving a model meant to be private.
        revision: the branch to commit to (created from main if missing); main by default.
        commit_message: the commit title; `Upload <folder name>` by default.
        dry_run: validate and list the files only; no token needed and no network request made.
        api: the client (a default `HfApi()` uses `HF_ENDPOINT` and the usual token resolution).
        allow_extra_files: glob patterns admitting files a model folder does not usually hold (see
            `validate_model_folder`).
        allow_modified_code: upload package code files that differ from the installed package's copy.
        base_model: the Hub id of the base model (see `validate_model_folder`).

    Returns:
        A `PushResult` with the files and, unless `dry_run`, the commit URL and id.
    """
    folder = Path(folder)
    files = validate_model_folder(
        folder, allow_extra_files, allow_modified_code, repo_id=repo_id, base_model=base_model
    )
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
    "find_in_stream",
    "find_local_paths",
    "find_secrets",
    "format_size",
    "is_allowed",
    "is_local_path",
    "is_secret",
    "list_upload_files",
    "package_code_files",
    "push_folder_to_hub",
    "relative_local_paths",
    "scan_folder",
    "validate_model_folder",
]
