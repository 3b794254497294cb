"""A stub of the Hub's HTTP API, enough for huggingface_hub's snapshot_download to download over plain HTTP.

It answers the four requests snapshot_download makes: the repo info at a revision (to learn the commit), the tree
listing at that commit, and per file a HEAD (commit, etag, size) then a GET of the bytes at /<repo>/resolve/...
Every request is recorded, so a test can see what was fetched. A repo or revision it does not hold gets the Hub's
own error headers (X-Error-Code), so huggingface_hub raises its own exception types.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class StubRepos:
    """repo -> commit -> {path in repo: bytes}, and repo -> ref -> commit."""

    commits: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)  # "<repo>/<path>" of every file body served

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        commit = hashlib.sha1(repo.encode() + b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        self.commits.setdefault(repo, {})[commit] = files
        self.refs.setdefault(repo, {})[ref] = commit
        return commit

    def add_folder(self, repo: str, folder: Path, prefix: str = "", ref: str = "main") -> str:
        files = {prefix + str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.add(repo, files, ref)

    def commit(self, repo: str, revision: str) -> str | None:
        known = self.commits.get(repo, {})
        return revision if revision in known else self.refs.get(repo, {}).get(revision)


def _handler(repos: StubRepos) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            # /api/models/{repo} is the default branch's info, as the Hub answers repo_info without a revision.
            api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?$", path)
            blob = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            repo = (api or blob)[1] if (api or blob) else ""
            if repo not in repos.commits:
                return self._send(401, headers={"X-Error-Code": "RepoNotFound"})
            commit = repos.commit(repo, (api[3] or "main") if api else blob[2])  # type: ignore[index]
            if commit is None:
                return self._send(404, headers={"X-Error-Code": "RevisionNotFound"})
            files = repos.commits[repo][commit]
            if api and api[2] != "tree":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in sorted(files)]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if api:
                tree = [_entry(p, data) for p, data in sorted(files.items())]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            data = files.get(blob[3]) if blob else None
            if data is None:
                return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
            if self.command == "GET":
                repos.fetched.append(f"{repo}/{blob[3]}")  # type: ignore[index]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag})

        do_GET = do_HEAD = _route

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


def _entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


@contextmanager
def stub_hub(repos: StubRepos) -> Iterator[str]:
    """Serve `repos` on a free local port; yields the endpoint URL for HF_ENDPOINT."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repos))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
