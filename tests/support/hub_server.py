"""A local, in-memory Hub on 127.0.0.1 for tests: the part of the Hub HTTP API that huggingface_hub's
download path (``hf_hub_download``, ``repo_info``, transformers' ``from_pretrained``) and its regular
(non-LFS, non-Xet) commit path (``create_repo``, ``create_branch``, ``upload_folder`` -> ``preupload`` +
NDJSON ``commit``) use. Every file is uploaded as a "regular" base64 file, so no LFS / Xet transfer is
needed. Failures can be injected per route: an HTTP status, a dropped connection, or the whole server
stopping mid-request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

import pytest
import yaml

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|preupload|commit|branch)/(.+))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class _Repo:
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: Dict[str, str] = field(default_factory=dict)  # branch -> sha


class LocalHub:
    """Start with :meth:`start` (returns the endpoint URL), stop with :meth:`stop` (idempotent)."""

    def __init__(self) -> None:
        self.repos: Dict[Tuple[str, str], _Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self._failures: Dict[str, Union[int, str]] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    # ------------------------------------------------------------------ control
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fail_next(self, route: str, how: Union[int, str]) -> None:
        """Make the next request to ``route`` (create, branch, preupload, commit, info, resolve, validate)
        fail with status ``how``, or drop the connection (``"disconnect"``), or stop the server (``"stop"``)."""
        self._failures[route] = how

    def add_repo(self, repo_id: str, files: Dict[str, bytes], repo_type: str = "model") -> str:
        """Create a repo holding ``files``; returns the commit sha."""
        repo = self.repos.setdefault((repo_type, repo_id), _Repo())
        return self._commit(repo, "main", dict(files))

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> Dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.refs.get(revision, revision)]

    def _commit(self, repo: _Repo, branch: str, files: Dict[str, bytes]) -> str:
        digest = hashlib.sha1(repr((branch, len(repo.commits), sorted(files.items()))).encode()).hexdigest()
        repo.commits[digest] = files
        repo.refs[branch] = digest
        return digest


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, headers=None, head: bool = False) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _injected(self, route: str) -> bool:
        how = self.hub._failures.pop(route, None)
        if how is None:
            return False
        if how in ("disconnect", "stop"):
            if how == "stop":
                threading.Thread(target=self.hub.stop, daemon=True).start()
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        # Read the request body first, as a real server does: a body left unread on a kept-alive connection would
        # be parsed as the next request and break the client's retry (a flaky "Server disconnected").
        self._body()
        self._error(int(how), "InjectedFailure", f"injected failure on {route}")
        return True

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((method, path))
        with self.hub._lock:
            if path == "/api/repos/create" and method == "POST":
                return self._injected("create") or self._create_repo()
            if path == "/api/validate-yaml" and method == "POST":
                return self._injected("validate") or self._validate_yaml()
            match = _API.match(path)
            if match:
                kind, repo_id, action, rest = match.groups()
                key = (_TYPES[kind], repo_id)
                if key not in self.hub.repos:
                    return self._error(404, "RepoNotFound", f"repository {repo_id} not found")
                if method == "GET" and action in (None, "revision"):
                    return self._injected("info") or self._info(key, rest or "main")
                if method == "POST" and action in ("preupload", "commit", "branch"):
                    handler = {"preupload": self._preupload, "commit": self._apply_commit, "branch": self._branch}
                    return self._injected(action) or handler[action](key, rest)
            match = _RESOLVE.match(path)
            if match and method in ("GET", "HEAD"):
                kind, repo_id, revision, filename = match.groups()
                return self._injected("resolve") or self._resolve(
                    (_TYPES.get(f"{kind}", "model") if kind else "model", repo_id), revision, filename, method == "HEAD"
                )
            self._error(404, "NotImplemented", f"local test hub: no route for {method} {path}")

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_HEAD = lambda self: self._route("HEAD")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}"
        key = (payload.get("type") or "model", repo_id)
        url = f"{self.hub.url}/{'' if key[0] == 'model' else key[0] + 's/'}{repo_id}"
        if key in self.hub.repos:  # the Hub answers 409 with the repo's url
            return self._json(409, {"error": "You already created this repo", "url": url})
        self.hub._commit(self.hub.repos.setdefault(key, _Repo()), "main", {".gitattributes": b""})
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        parts = content.split("---\n")
        try:
            metadata = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) > 2 else None
            if metadata is not None and not isinstance(metadata, dict):
                raise yaml.YAMLError("metadata is not a mapping")
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": str(error)}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _sha(self, repo: _Repo, revision: str) -> Optional[str]:
        return revision if revision in repo.commits else repo.refs.get(revision)

    def _info(self, key, revision: str) -> None:
        repo = self.hub.repos[key]
        sha = self._sha(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"revision {revision} not found")
        self._json(200, {"id": key[1], "sha": sha, "private": False,
                         "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])]})

    def _preupload(self, key, revision: str) -> None:
        files = json.loads(self._body())["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def _apply_commit(self, key, revision: str) -> None:
        repo = self.hub.repos[key]
        base = self._sha(repo, revision)
        if base is None:
            return self._error(404, "RevisionNotFound", f"branch {revision} not found")
        files = dict(repo.commits[base])
        for line in self._body().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._error(400, "Unsupported", f"local test hub: unsupported commit operation {item['key']}")
        sha = self.hub._commit(repo, revision, files)
        self._json(200, {"commitUrl": f"{self.hub.url}/{key[1]}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _branch(self, key, branch: str) -> None:
        repo = self.hub.repos[key]
        if branch in repo.refs:
            return self._error(409, "BranchExists", f"branch {branch} already exists")
        self._body()
        repo.refs[branch] = repo.refs["main"]
        self._json(200, {})

    def _resolve(self, key, revision: str, filename: str, head: bool) -> None:
        repo = self.hub.repos.get(key)
        if repo is None:
            return self._error(404, "RepoNotFound", "repository not found", head=head)
        sha = self._sha(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"revision {revision} not found", head=head)
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", f"{filename} not found", {"X-Repo-Commit": sha}, head=head)
        etag = hashlib.sha256(content).hexdigest()
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                   head=head)


# ---------------------------------------------------------------------------------------------- client set-up
def point_hub_client(monkeypatch, *, endpoint: Optional[str], cache_dir, offline: bool) -> None:
    """Point huggingface_hub (and transformers) at ``endpoint`` and ``cache_dir``, as the environment
    variables ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` / ``HF_HUB_DISABLE_XET`` would at
    start-up (huggingface_hub reads them into ``constants`` on import, so the constants are patched too)."""
    from huggingface_hub import constants
    import transformers.utils.hub as transformers_hub

    endpoint = endpoint or "http://127.0.0.1:9"  # offline tests: nothing may be reached anyway
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_local_test_token"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers caches an HfApi bound to the endpoint


def fill_hf_cache(cache_dir, repo_id: str, files: Dict[str, bytes], repo_type: str = "model", revision: str = "main"):
    """Write ``files`` into an HF cache in the layout ``hf_hub_download`` produces
    (``blobs/<etag>``, ``snapshots/<commit>/<path>`` symlinks, ``refs/<revision>``); returns the commit."""
    from pathlib import Path

    folder = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        pointer = folder / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """A running :class:`LocalHub` with the client pointed at it (fresh, empty HF cache); always stopped."""
    hub = LocalHub()
    try:
        point_hub_client(monkeypatch, endpoint=hub.start(), cache_dir=tmp_path / "hf-cache", offline=False)
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """An empty HF cache directory with the client offline (``HF_HUB_OFFLINE=1``); fill it with fill_hf_cache."""
    cache = tmp_path / "hf-cache"
    point_hub_client(monkeypatch, endpoint=None, cache_dir=cache, offline=True)
    return cache
