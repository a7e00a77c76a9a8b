"""A small Hub-compatible HTTP server for tests (standard library only).

It speaks enough of huggingface.co's HTTP API for the real `huggingface_hub` client to push a model (whoami, repo
create, validate-yaml, preupload, NDJSON commits, branches) and for transformers to pull it (model info, refs, tree,
resolve with `X-Repo-Commit`/`ETag`, `X-Error-Code` on misses). Every file is a "regular" (inline base64) upload,
so no LFS or Xet storage is involved. Repositories live in memory; each commit is a full snapshot.

    with HubServer() as hub:           # 127.0.0.1 on a free port, served from a daemon thread
        env["HF_ENDPOINT"] = hub.url   # then run the client in a subprocess (HF_ENDPOINT is read at import)
        ...
        hub.state.requests             # [(method, path), ...]: what the clients asked for
        hub.state.unrouted             # the requests no route matched (should stay empty)
        hub.state.repos["tester/x"]    # .private, .branches, .files(revision)

Run it by hand with `python tests/hub_server.py --port 8765`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
MAIN = "main"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file's content (what the Hub returns as a regular file's ETag and oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answer: status, `X-Error-Code` header (or None) and message."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Repo:
    """One model repository: visibility, branch heads and one full file snapshot (and title) per commit."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # commit id -> commit title

    def resolve(self, revision: str) -> str:
        """A branch name or a commit id -> the commit id."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.snapshots:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def files(self, revision: str = MAIN) -> dict[str, bytes]:
        return self.snapshots[self.resolve(revision)]


class HubState:
    """Everything the server knows, shared by its request threads."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unrouted: list[tuple[str, str]] = []  # requests no route matched: a client feature this server lacks
        self.lock = threading.Lock()
        self._commits = 0

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        """Store a snapshot as a new commit on `branch` and return its id."""
        self._commits += 1
        digest = hashlib.sha1(f"{repo.repo_id}\n{branch}\n{message}\n{self._commits}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{git_blob_sha(files[path])}\n".encode())
        sha = digest.hexdigest()
        repo.snapshots[sha] = files
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the matching `route_*` method."""

    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the request list in `HubState` is the log (method and path only, never headers)."""

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def read_body(self) -> bytes:
        """The request body; always read in full so that a kept-alive connection stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, value: object, status: int = 200) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json")

    def dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        body = self.read_body()
        state = self.server.state
        with state.lock:
            state.requests.append((method, split.path))
            try:
                self.route(method, segments, query, body)
            except HubError as error:
                self.reply_error(error)
            except Exception as error:  # a bug here must reach the client as an answer, not a dropped connection
                self.reply_error(HubError(500, None, f"test Hub failed: {type(error).__name__}: {error}"))

    def reply_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self.reply(error.status, json.dumps({"error": error.message}).encode(), "application/json", headers)

    # ---- routing -------------------------------------------------------------------------------------------------

    def route(self, method: str, seg: list[str], query: dict, body: bytes) -> None:
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self.route_whoami()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self.route_create(json.loads(body or b"{}"))
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self.route_delete(json.loads(body or b"{}"))
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.route_validate_yaml(json.loads(body or b"{}"))
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo = self.repo(f"{seg[2]}/{seg[3]}", write=method == "POST")
            action, rest = (seg[4], seg[5:]) if len(seg) > 4 else ("info", [])
            if method == "POST" and action == "preupload" and len(rest) == 1:
                return self.route_preupload(repo, rest[0], json.loads(body or b"{}"))
            if method == "POST" and action == "commit" and len(rest) == 1:
                return self.route_commit(repo, rest[0], body, query)
            if method == "POST" and action == "branch" and len(rest) == 1:
                return self.route_branch(repo, rest[0], json.loads(body or b"{}"))
            if method == "GET" and action == "refs":
                return self.route_refs(repo)
            if method == "GET" and action == "info":
                return self.route_info(repo, MAIN)
            if method == "GET" and action == "revision" and len(rest) == 1:
                return self.route_info(repo, rest[0])
            if method == "GET" and action == "tree" and rest:
                return self.route_tree(repo, rest[0], "/".join(rest[1:]), query)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self.route_resolve(self.repo(f"{seg[0]}/{seg[1]}"), seg[3], "/".join(seg[4:]))
        self.server.state.unrouted.append((method, self.path))
        raise HubError(404, None, f"This test Hub has no route for {method} /{'/'.join(seg)}")

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return auth.removeprefix("Bearer ").strip() or None

    def repo(self, repo_id: str, write: bool = False) -> Repo:
        """The repository, as the Hub shows it: a missing one, or a private one to an anonymous client, is not found."""
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and self.token() is None):
            raise HubError(404 if repo is None else 401, "RepoNotFound", f"Repository not found: {repo_id}")
        if write and self.token() is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return repo

    # ---- account and repositories --------------------------------------------------------------------------------

    def route_whoami(self) -> None:
        if self.token() is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        self.reply_json({"type": "user", "name": USER, "fullname": "Test User", "orgs": [], "auth": {}})

    def route_create(self, payload: dict) -> None:
        if self.token() is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        if payload.get("type", "model") != "model":
            raise HubError(400, None, "This test Hub holds model repositories only")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        state = self.server.state
        if repo_id in state.repos:
            return self.reply_json({"error": "You already created this model repo", "url": url}, status=409)
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        state.repos[repo_id] = repo
        state.commit(repo, MAIN, {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.reply_json({"url": url, "name": repo_id})

    def route_delete(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        self.repo(repo_id, write=True)
        del self.server.state.repos[repo_id]
        self.reply_json({})

    def route_validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            front_matter = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                yaml.safe_load(front_matter)
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML in README.md metadata: {error}"})
        self.reply_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    # ---- pushing --------------------------------------------------------------------------------------------------

    def route_preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        current = repo.files(revision)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload.get("files", [])
        ]
        self.reply_json({"files": files, "commitOid": repo.resolve(revision)})

    def route_commit(self, repo: Repo, branch: str, body: bytes, query: dict) -> None:
        if query.get("create_pr"):
            raise HubError(400, None, "This test Hub does not support pull requests")
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Branch {branch} does not exist; create it first")
        files = dict(repo.files(branch))
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and not repo.branches[branch].startswith(parent):
                    raise HubError(412, None, f"parentCommit {parent} is not the head of {branch}")
            elif key == "file":
                content = value["content"]
                files[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, None, f"This test Hub accepts only regular files, got a {key!r} operation")
        sha = self.server.state.commit(repo, branch, files, message)
        self.reply_json(
            {"commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def route_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
        start = repo.resolve(payload.get("startingPoint") or MAIN)
        repo.branches[branch] = start
        self.reply_json({})

    # ---- pulling --------------------------------------------------------------------------------------------------

    def route_refs(self, repo: Repo) -> None:
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha} for n, sha in repo.branches.items()]
        self.reply_json({"branches": branches, "converts": [], "tags": []})

    def route_info(self, repo: Repo, revision: str) -> None:
        sha = repo.resolve(revision)
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(repo.snapshots[sha].items())]
        self.reply_json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "library_name": "transformers",
            }
        )

    def route_tree(self, repo: Repo, revision: str, folder: str, query: dict) -> None:
        files = repo.files(revision)
        prefix = folder.rstrip("/") + "/" if folder else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entries.append({"type": "file", "path": path, "oid": git_blob_sha(data), "size": len(data)})
        if prefix and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        entries += [{"type": "directory", "path": path, "oid": git_blob_sha(path.encode())} for path in sorted(folders)]
        self.reply_json(entries)

    def route_resolve(self, repo: Repo, revision: str, path: str) -> None:
        sha = repo.resolve(revision)
        data = repo.snapshots[sha].get(path)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        self.reply(200, data, "application/octet-stream", headers)


class HubServer(ThreadingHTTPServer):
    """The test Hub on 127.0.0.1; `port=0` picks a free port. Use as a context manager, or `start()`/`stop()`."""

    daemon_threads = True

    def __init__(self, port: int = 0):
        super().__init__(("127.0.0.1", port), HubHandler)
        self.state = HubState()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the test Hub until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    server = HubServer(parser.parse_args().port)
    print(f"HF_ENDPOINT={server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
