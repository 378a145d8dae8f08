"""A local fake of the Hugging Face Hub HTTP API (standard library only), plus the ``hub`` pytest fixture.

Repos live in memory: every commit keeps its full, copy-on-write ``{path: bytes}`` file set, and refs (branches and
``refs/pr/N``) map names to commit shas. The routes are the ones huggingface_hub 2.x sends for ``create_repo``,
``upload_folder``/``create_commit``, ``model_info``/``repo_info``, ``list_repo_tree``/``list_repo_files``,
``hf_hub_download`` and ``snapshot_download``. Every file is a plain git blob: preupload always answers
``uploadMode: "regular"`` and no ``X-Xet-*``/``X-Linked-*`` header is sent, so no LFS or Xet transfer happens.
Errors carry the ``X-Error-Code`` the client maps to exceptions (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``). Repo ids must be ``namespace/name``; repo types share one namespace.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_REPO = r"(?:(?:datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"
_API = r"/api/(?:models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
# (methods, pattern over the still-quoted URL path, FakeHub method)
_ROUTES = [
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "_tree"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "_commit"),
    ("GET HEAD", "/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_download"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub sends as the ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class _Repo:
    def __init__(self, private: bool) -> None:
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}  # sha -> full file set of that commit
        self.times: dict[str, str] = {}  # sha -> ISO date
        self.refs: dict[str, str] = {}  # "main", other branches, "refs/pr/N" -> sha
        self.n_prs = 0


class FakeHub:
    """In-memory Hub served on 127.0.0.1 (OS-chosen port) from a daemon thread; see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    # -- test helpers -------------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch, ``refs/pr/N`` or full commit sha."""
        repo, sha = self._resolve(repo_id, revision)
        return dict(repo.commits[sha])

    def put_files(self, repo_id: str, files: dict[str, bytes], message: str = "manual") -> str:
        """Create the repo if needed and commit ``files`` on main, bypassing HTTP. Returns the commit sha."""
        with self._lock:
            self._create(repo_id, private=False)
            return self._new_commit(repo_id, "main", dict(files), message)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- state --------------------------------------------------------------------------------------------------
    def _create(self, repo_id: str, private: bool) -> bool:
        """Create ``repo_id`` with an empty initial commit on main; False when it already exists."""
        with self._lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = _Repo(private)
            self._new_commit(repo_id, "main", {}, "initial commit")
            return True

    def _new_commit(self, repo_id: str, ref: str, changes: dict[str, bytes | None], message: str,
                    parent: str | None = None) -> str:
        """Commit ``changes`` (None deletes a path) on top of ``parent`` (default: the ref head), move ``ref``."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = parent or repo.refs.get(ref)
            files = {**(repo.commits[parent] if parent else {}), **changes}
            files = {path: data for path, data in files.items() if data is not None}
            seed = f"{repo_id}\0{parent}\0{message}\0{next(self._counter)}\0{time.time_ns()}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = files
            repo.times[sha] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.refs[ref] = sha
            return sha

    def _resolve(self, repo_id: str, revision: str) -> tuple[_Repo, str]:
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
            if revision in repo.refs:
                return repo, repo.refs[revision]
            if revision in repo.commits:
                return repo, revision
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- routes: each gets the query dict, the request body and the unquoted groups of its pattern, and returns
    #    (status, payload[, headers]); a bytes payload is sent as is, anything else as JSON ----------------------
    def _create_repo(self, query: dict, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        created = self._create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        url = {"url": f"{self.url}/{repo_id}", "name": repo_id}
        # the client reads "url" from the 409 body too when exist_ok=True
        return (200, url) if created else (409, {"error": "You already created this model repo", **url})

    def _validate_yaml(self, query: dict, body: bytes) -> tuple[int, dict]:
        """Model-card metadata check that upload_folder runs for a README.md: accept everything."""
        return 200, {"errors": [], "warnings": []}

    def _info(self, query: dict, body: bytes, repo: str, rev: str | None) -> tuple[int, dict]:
        r, sha = self._resolve(repo, rev or "main")
        files = r.commits[sha]
        return 200, {
            "_id": sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
            "private": r.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": r.times[sha], "createdAt": min(r.times.values()),
            "siblings": [{"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)}
                         for p, d in sorted(files.items())],
        }

    def _tree(self, query: dict, body: bytes, repo: str, rev: str, path: str | None) -> tuple[int, list]:
        r, sha = self._resolve(repo, rev)
        prefix = path.strip("/") + "/" if path and path.strip("/") else ""
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for p, data in r.commits[sha].items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):  # folders on the way
                folder = prefix + "/".join(parts[:i])
                oid = git_blob_sha1(folder.encode())  # any stable id will do
                entries[folder] = {"type": "directory", "path": folder, "size": 0, "oid": oid}
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return 200, [entries[k] for k in sorted(entries)]

    def _preupload(self, query: dict, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
        r, sha = self._resolve(repo, rev)
        current = r.commits[sha]
        return 200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None}
            for f in json.loads(body)["files"]]}

    def _commit(self, query: dict, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
        r, head = self._resolve(repo, rev)
        if rev not in r.refs:
            raise HubError(400, f"Cannot commit to {rev}: not a branch")
        header, changes = {}, {}
        for line in filter(None, body.decode().splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                raw = value["content"]
                changes[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                changes.update({p: None for p in r.commits[head] if p.startswith(folder)})
            else:  # lfsFile: the preupload answer never asks for LFS
                raise HubError(400, f"Unsupported commit operation {key!r} (no LFS in the fake hub)")
        parent = header.get("parentCommit")
        with self._lock:
            if query.get("create_pr") == "1":
                r.n_prs += 1
                ref = f"refs/pr/{r.n_prs}"
                sha = self._new_commit(repo, ref, changes, header.get("summary", ""), parent=parent or head)
                pr_url = f"{self.url}/{repo}/discussions/{r.n_prs}"
            else:
                if parent and parent != r.refs[rev]:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
                sha = self._new_commit(repo, rev, changes, header.get("summary", ""))
                pr_url = None
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}

    def _download(self, query: dict, body: bytes, repo: str, rev: str, path: str) -> tuple[int, bytes, dict]:
        r, sha = self._resolve(repo, rev)
        commit_header = {"X-Repo-Commit": sha}
        if path not in r.commits[sha]:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=commit_header)
        data = r.commits[sha][path]
        etag = f'"{git_blob_sha1(data)}"'  # the client names the cached blob after it
        return 200, data, {**commit_header, "ETag": etag, "Content-Type": "application/octet-stream"}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-server subclass

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET  # unknown routes get a JSON 404 whatever the method

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for methods, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, url.path)
                if self.command in methods.split() and match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    status, payload, *headers = getattr(self.hub, name)(query, body, **groups)
                    if isinstance(payload, bytes):
                        return self._send(status, payload, headers[0] if headers else {})
                    return self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})
            raise HubError(404, f"Unknown route {self.command} {url.path}")
        except HubError as e:
            headers = {"Content-Type": "application/json", "X-Error-Message": str(e), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, json.dumps({"error": str(e)}).encode(), headers)
        except Exception as e:  # a bug in the fake: report it instead of hanging the client
            self._send(500, json.dumps({"error": f"fake hub: {e!r}"}).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """A fresh FakeHub, with huggingface_hub pointed at it and using an empty cache under ``tmp_path``."""
    from huggingface_hub import constants, hf_api

    server = FakeHub()
    cache = tmp_path / "hf_home" / "hub"
    for key, value in {"HF_ENDPOINT": server.url, "HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache),
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                       "HF_TOKEN": "hf_fake"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # constants are read at call time (constants.X), but were computed from the env at import
    for key, value in {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
        # without Xet, upload_folder takes the single-commit path (`?create_pr=1`) instead of the Xet pipeline,
        # which opens pull requests through the discussions API
        "HF_HUB_DISABLE_XET": True,
        "HF_TOKEN_PATH": str(cache.parent / "token"), "HF_STORED_TOKENS_PATH": str(cache.parent / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, key, value)
    # the module-level HfApi behind huggingface_hub.create_repo/upload_folder/model_info/... froze its endpoint
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    yield server
    server.close()
