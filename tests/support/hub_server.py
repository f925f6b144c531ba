"""An in-memory Hugging Face Hub on loopback: the HTTP endpoints ``huggingface_hub`` uses to create a repo,
commit regular (non-LFS) files, tag a commit and download a snapshot.

Repos live in memory as commits (full file sets) with branch and tag refs. Writes need
``Authorization: Bearer <token>``; private repos need it for reads too, as on the Hub.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

USER = "tester"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def blob_id(data: bytes) -> str:
    """Git's object id of a blob: the ETag the Hub gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclasses.dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str | None] = dataclasses.field(default_factory=lambda: {"main": None})
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag or commit oid names (None for an unknown one or an empty branch)."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubServer(ThreadingHTTPServer):
    """The server; ``start()`` serves from a daemon thread, ``url`` is its endpoint."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, args=(0.05,), name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        for route_method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                try:
                    with self.server.lock:
                        handler(self, body, **args)
                except HubError as err:
                    self._json({"error": str(err)}, err.status)
                return
        self._json({"error": f"no route for {method} {path}"}, HTTPStatus.NOT_FOUND)

    def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _require_token(self) -> None:
        if not self._authorized():
            raise HubError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_token()
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # As on the Hub, a private repo and a missing one look alike to a caller without the token.
            status = HTTPStatus.NOT_FOUND if self._authorized() else HTTPStatus.UNAUTHORIZED
            raise HubError(status, "Repository not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}")
        return commit

    # -- endpoints ----------------------------------------------------------------------------------
    def validate_yaml(self, body: bytes) -> None:
        self._json({"errors": [], "warnings": []})

    def create_repo(self, body: bytes) -> None:
        self._require_token()
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:  # the Hub's conflict answer also carries the url (create_repo reads it)
            self._json({"error": "You already created this model repo", "url": url}, HTTPStatus.CONFLICT)
            return
        self.server.repos[repo_id] = Repo(private=payload.get("visibility", "public") == "private")
        self._json({"url": url, "name": repo_id})

    def preupload(self, body: bytes, repo: str, revision: str) -> None:
        existing = self._repo(repo, write=True).resolve(revision)
        files = []
        for entry in json.loads(body)["files"]:
            remote = existing.files.get(entry["path"]) if existing else None
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": blob_id(remote) if remote is not None else None,
                }
            )
        self._json({"files": files, "commitOid": existing.oid if existing else None})

    def commit(self, body: bytes, repo: str, revision: str) -> None:
        hub_repo = self._repo(repo, write=True)
        if revision not in hub_repo.branches:
            raise HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}")
        parent = hub_repo.resolve(revision)
        files = dict(parent.files) if parent else {}
        header: dict[str, Any] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(HTTPStatus.BAD_REQUEST, f"unsupported commit operation {item['key']!r}")
        seed = json.dumps([parent.oid if parent else None, header, {p: blob_id(d) for p, d in sorted(files.items())}])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        hub_repo.commits[oid] = Commit(oid, header.get("summary", ""), files)
        hub_repo.branches[revision] = oid
        self._json({"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    def create_tag(self, body: bytes, repo: str, revision: str) -> None:
        hub_repo = self._repo(repo, write=True)
        tag = json.loads(body)["tag"]
        if tag in hub_repo.tags:
            raise HubError(HTTPStatus.CONFLICT, f"Tag {tag} already exists")
        hub_repo.tags[tag] = self._commit(hub_repo, revision).oid
        self._json({})

    def delete_tag(self, body: bytes, repo: str, revision: str) -> None:
        hub_repo = self._repo(repo, write=True)
        if hub_repo.tags.pop(revision, None) is None:
            raise HubError(HTTPStatus.NOT_FOUND, f"Tag {revision} does not exist")
        self._json({})

    def repo_info(self, body: bytes, repo: str, revision: str) -> None:
        hub_repo = self._repo(repo)
        commit = self._commit(hub_repo, revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._json({"id": repo, "sha": commit.oid, "private": hub_repo.private, "siblings": siblings})

    def tree(self, body: bytes, repo: str, revision: str) -> None:
        commit = self._commit(self._repo(repo), revision)
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": blob_id(data)}
            for path, data in sorted(commit.files.items())
        ]
        self._json(entries)

    def resolve_file(self, body: bytes, repo: str, revision: str, filename: str) -> None:
        commit = self._commit(self._repo(repo), revision)
        if filename not in commit.files:
            self._send(
                HTTPStatus.NOT_FOUND,
                b'{"error": "Entry not found"}',
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid, "Content-Type": "application/json"},
            )
            return
        data = commit.files[filename]
        self._send(
            HTTPStatus.OK,
            data,
            {"X-Repo-Commit": commit.oid, "ETag": f'"{blob_id(data)}"', "Content-Type": "application/octet-stream"},
        )


_Route = tuple[str, str, Callable[..., None]]
_ROUTES: list[_Route] = [
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{_REPO}/tag/(?P<revision>[^/]+)", _Handler.create_tag),
    ("DELETE", rf"/api/models/{_REPO}/tag/(?P<revision>[^/]+)", _Handler.delete_tag),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)/?", _Handler.tree),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _Handler.resolve_file),
    ("HEAD", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _Handler.resolve_file),
]
