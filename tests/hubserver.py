"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing the real huggingface_hub code path.

It serves local folders as the branches of model repos, with the routes and headers huggingface_hub
uses to list refs and trees and to download files, accepts commit ids wherever it accepts branch names,
and counts downloads per (repo, revision, file) so tests can check that each revision is fetched once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin")


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}  # repo -> branch -> folder
        self.datasets: dict[str, dict[str, Path]] = {}  # dataset repos, the same way
        self.gets: Counter = Counter()  # (repo, branch, file) -> GET count
        self.stall: tuple[str, str] | None = None  # (branch, file): hold its GET until `release` is set
        self.corrupt: Counter = Counter()  # (branch, file) -> how many more GETs serve it with one byte flipped
        self.requests: list[str] = []  # every request's method and path, in order
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._sha: dict[Path, str] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_branch(self, repo: str, branch: str, folder: Path) -> None:
        self.repos.setdefault(repo, {})[branch] = Path(folder)

    def add_dataset(self, repo: str, folder: Path, branch: str = "main") -> None:
        """A dataset repo: `folder`'s files at any depth, as `datasets.load_dataset(repo)` reads them."""
        self.datasets.setdefault(repo, {})[branch] = Path(folder)

    @staticmethod
    def commit(repo: str, branch: str) -> str:
        return hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- repository model ---------------------------------------------------------------------
    def resolve(self, repo: str, rev: str, kind: str = "models") -> str | None:
        branches = (self.datasets if kind == "datasets" else self.repos).get(repo, {})
        if rev in branches:
            return rev
        return next((b for b in branches if self.commit(repo, b) == rev), None)

    def sha256(self, path: Path) -> str:
        if path not in self._sha:
            self._sha[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._sha[path]

    def entry(self, folder: Path, name: str) -> dict:
        path = folder / name
        if path.is_dir():
            return {"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest()}
        size = path.stat().st_size
        item = {"type": "file", "path": name, "size": size, "oid": _git_blob_sha(path.read_bytes())}
        if name.endswith(LFS_SUFFIXES):
            item["lfs"] = {"oid": self.sha256(path), "size": size, "pointerSize": 134}
        return item

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj) -> None:
                self._send(200, json.dumps(obj).encode())

            def _error(self, status: int, code: str, message: str) -> None:
                self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code,
                                                                             "X-Error-Message": message})

            def _repo_rev(self, parts: list[str], kind: str = "models") -> tuple[str, str, str] | None:
                repo = "/".join(parts[:2])
                if repo not in (server.datasets if kind == "datasets" else server.repos):
                    self._error(404, "RepoNotFound", f"Repository {repo} not found")
                    return None
                rev = unquote(parts[3]) if len(parts) > 3 else "main"
                branch = server.resolve(repo, rev, kind)
                if branch is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None
                return repo, rev, branch

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                server.requests.append(f"{self.command} {self.path}")
                url = urlparse(self.path)
                parts = [p for p in url.path.split("/") if p]
                if parts[:2] == ["api", "agent-harnesses"]:
                    return self._json({"standardEnvVars": [], "harnesses": {}})
                if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "refs":
                    return self._refs(parts[2:4])
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    found = self._repo_rev(parts[2:4] + [parts[4], "/".join(parts[5:6])])
                    if found is None:
                        return None
                    repo, _, branch = found
                    folder = server.repos[repo][branch]
                    names = sorted(p.name for p in folder.iterdir() if p.is_file())
                    if parts[4] == "tree":
                        return self._json([server.entry(folder, n) for n in names])
                    return self._json({"id": repo, "sha": server.commit(repo, branch),
                                       "siblings": [{"rfilename": n} for n in names]})
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(parts)
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    return self._dataset_api(parts[2:], parse_qs(url.query))
                if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                    return self._resolve(parts[1:], "datasets")
                self._error(404, "EntryNotFound", f"no route for {url.path}")

            def _dataset_api(self, parts: list[str], query: dict) -> None:
                """info (`REPO`, `REPO/revision/REV`) and `REPO/tree/REV[/PATH]` of a dataset repo."""
                what = parts[2] if len(parts) > 2 else "revision"
                found = self._repo_rev(parts[:2] + [what, parts[3] if len(parts) > 3 else "main"], "datasets")
                if found is None:
                    return None
                repo, _, branch = found
                folder = server.datasets[repo][branch]
                files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                if what == "tree":
                    under = unquote("/".join(parts[4:]))
                    base = folder / under
                    found_paths = base.rglob("*") if query.get("recursive", ["false"])[0] == "true" else base.iterdir()
                    return self._json([server.entry(folder, str(p.relative_to(folder))) for p in sorted(found_paths)])
                return self._json({"id": repo, "sha": server.commit(repo, branch), "private": False,
                                   "siblings": [{"rfilename": n} for n in files], "cardData": {}, "tags": []})

            def do_POST(self) -> None:
                server.requests.append(f"POST {self.path}")
                parts = [p for p in urlparse(self.path).path.split("/") if p]
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length).decode()
                kind = parts[1] if len(parts) > 1 else ""
                if kind in ("models", "datasets") and len(parts) >= 6 and parts[4] == "paths-info":
                    found = self._repo_rev(parts[2:4] + ["paths-info", unquote(parts[5])], kind)
                    if found is None:
                        return None
                    repo, _, branch = found
                    folder = (server.datasets if kind == "datasets" else server.repos)[repo][branch]
                    try:
                        paths = json.loads(body)["paths"]
                    except (ValueError, KeyError):
                        paths = parse_qs(body).get("paths", [])
                    return self._json([server.entry(folder, p) for p in paths if (folder / p).exists()])
                self._error(404, "EntryNotFound", "no route")

            def _refs(self, repo_parts: list[str]) -> None:
                repo = "/".join(repo_parts)
                if repo not in server.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo} not found")
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": server.commit(repo, b)}
                            for b in server.repos[repo]]
                self._json({"branches": branches, "converts": [], "tags": []})

            def _resolve(self, parts: list[str], kind: str = "models") -> None:
                found = self._repo_rev(parts[:2] + ["resolve", parts[3]], kind)
                if found is None:
                    return None
                repo, _, branch = found
                name = unquote("/".join(parts[4:]))
                path = (server.datasets if kind == "datasets" else server.repos)[repo][branch] / name
                if not path.is_file():
                    return self._error(404, "EntryNotFound", f"{name} not found in {branch}")
                data = path.read_bytes()
                etag = server.sha256(path) if name.endswith(LFS_SUFFIXES) else _git_blob_sha(data)
                headers = {"X-Repo-Commit": server.commit(repo, branch), "ETag": f'"{etag}"',
                           "Accept-Ranges": "bytes"}
                if name.endswith(LFS_SUFFIXES):
                    headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
                if self.command == "GET":
                    server.gets[(repo, branch, name)] += 1
                    if server.corrupt[(branch, name)] > 0:  # same length, same headers: only the hash tells
                        server.corrupt[(branch, name)] -= 1
                        mid = len(data) // 2  # in the tensor data, so that the file still parses
                        data = data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:]
                    if server.stall == (branch, name):
                        server.stalled.set()
                        server.release.wait(60)
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and self.command == "GET":
                    start = int(rng[6:].split("-")[0])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, data[start:], headers, "application/octet-stream")
                self._send(200, data, headers, "application/octet-stream")

        return Handler
