"""A small Hugging Face Hub stand-in on loopback, for push/pull tests with the real client.

It speaks the part of the Hub HTTP API that ``huggingface_hub`` uses for ``whoami``,
``create_repo``, ``create_branch``, ``upload_folder`` (card YAML validation, preupload + commit,
every file sent as a "regular" base64 blob: no LFS or Xet storage) and ``snapshot_download``
(repo info, file tree, file resolve). Repos live in memory; tokens map to user names. What it
does not cover: LFS/Xet uploads, pull requests, tags, gated repos, pagination, rate limits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch → commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → files


class FakeHub:
    """The server's state plus a running ``ThreadingHTTPServer`` on 127.0.0.1."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []  # the body of every create-repo request
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, owner: str, files: dict[str, bytes],
                 private: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo(owner, private))
        sha = _commit_sha(files, "")
        repo.commits[sha] = dict(files)
        repo.branches["main"] = sha
        return sha

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            # -- helpers --------------------------------------------------------------------
            def user(self) -> str | None:
                auth = self.headers.get("Authorization", "")
                return hub.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

            def reply(self, status: int, body=None, headers=None, head=False):
                data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if not isinstance(body, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def error(self, status: int, message: str, code: str | None = None, head=False):
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self.reply(status, {"error": message}, headers, head=head)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def visible(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and self.user() != repo.owner):
                    return None
                return repo

            def writable(self, repo_id: str) -> Repo | None:
                user = self.user()
                if user is None:
                    self.error(401, "Invalid credentials in Authorization header")
                    return None
                repo = self.visible(repo_id)
                if repo is None:
                    self.error(404, "Repository not found", "RepoNotFound")
                    return None
                if repo.owner != user:
                    self.error(403, f"You don't have the rights to write to {repo_id}")
                    return None
                return repo

            # -- routes -----------------------------------------------------------------------
            def do_GET(self):
                self.route(head=False)

            def do_HEAD(self):
                self.route(head=True)

            def route(self, head: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if path == "/api/whoami-v2":
                    user = self.user()
                    if user is None:
                        return self.error(401, "Invalid credentials in Authorization header",
                                          head=head)
                    return self.reply(200, {"type": "user", "name": user, "fullname": user,
                                            "orgs": [], "auth": {"type": "access_token",
                                            "accessToken": {"role": "write",
                                                            "displayName": "test"}}}, head=head)
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self.tree("/".join(parts[2:4]), parts[5], head)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    revision = "/".join(parts[5:]) if len(parts) > 5 and parts[4] == "revision" \
                        else "main"
                    return self.model_info(repo_id, revision, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
                return self.error(404, f"no route {path}", head=head)

            def commit_of(self, repo: Repo, revision: str) -> str | None:
                if revision in repo.branches:
                    return repo.branches[revision]
                return revision if revision in repo.commits else None

            def lookup(self, repo_id: str, revision: str, head: bool):
                """(repo, commit sha), or None after answering the Hub's 404."""
                repo = self.visible(repo_id)
                if repo is None:
                    self.error(404, "Repository not found", "RepoNotFound", head=head)
                    return None
                sha = self.commit_of(repo, revision)
                if sha is None:
                    self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
                    return None
                return repo, sha

            def model_info(self, repo_id: str, revision: str, head: bool):
                found = self.lookup(repo_id, revision, head)
                if found is None:
                    return None
                repo, sha = found
                files = repo.commits[sha]
                return self.reply(200, {
                    "id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": sha,
                    "private": repo.private, "disabled": False, "gated": False, "tags": [],
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                    "lastModified": "2026-01-01T00:00:00.000Z",
                }, head=head)

            def tree(self, repo_id: str, revision: str, head: bool):
                found = self.lookup(repo_id, revision, head)
                if found is None:
                    return None
                repo, sha = found
                return self.reply(200, [
                    {"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
                    for name, data in sorted(repo.commits[sha].items())], head=head)

            def resolve(self, repo_id: str, revision: str, filename: str, head: bool):
                found = self.lookup(repo_id, revision, head)
                if found is None:
                    return None
                repo, sha = found
                if filename not in repo.commits[sha]:
                    return self.error(404, "Entry not found", "EntryNotFound", head=head)
                data = repo.commits[sha][filename]
                etag = _blob_id(data)
                return self.reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                              "Content-Type": "application/octet-stream"},
                                  head=head)

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("POST", path))
                parts = path.strip("/").split("/")
                payload = self.body()
                if path == "/api/repos/create":
                    return self.create_repo(json.loads(payload))
                if path == "/api/validate-yaml":  # model-card header check before a commit
                    return self.reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                    repo = self.writable(repo_id)
                    if repo is None:
                        return None
                    if action == "branch":
                        if revision in repo.branches:
                            return self.error(409, "Branch already exists")
                        repo.branches[revision] = repo.branches["main"]
                        return self.reply(200, {})
                    if action == "preupload":
                        files = json.loads(payload)["files"]
                        return self.reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                             "oid": None} for f in files]})
                    if action == "commit":
                        return self.commit(repo_id, repo, revision, payload)
                return self.error(404, f"no route {path}")

            def create_repo(self, body: dict):
                hub.created.append(body)
                user = self.user()
                if user is None:
                    return self.error(401, "Invalid credentials in Authorization header")
                owner = body.get("organization") or user
                repo_id = f"{owner}/{body['name']}"
                if owner != user:
                    return self.error(403, f"You don't have the rights to create a model under "
                                           f"the namespace \"{owner}\"")
                if repo_id in hub.repos:  # the Hub's 409 names the repo, as create_repo reads
                    message = "You already created this model repo"
                    return self.reply(409, {"error": message, "url": f"{hub.endpoint}/{repo_id}"},
                                      {"X-Error-Message": message})
                hub.add_repo(repo_id, user, {".gitattributes": b"*.safetensors filter=lfs\n"},
                             private=bool(body.get("private")) or body.get("visibility") == "private")
                return self.reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

            def commit(self, repo_id: str, repo: Repo, revision: str, payload: bytes):
                sha = self.commit_of(repo, revision)
                if sha is None or revision not in repo.branches:
                    return self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                files = dict(repo.commits[sha])
                for line in payload.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                    elif item["key"] != "header":
                        return self.error(400, f"unsupported commit operation {item['key']}")
                new = _commit_sha(files, sha)
                repo.commits[new] = files
                repo.branches[revision] = new
                return self.reply(200, {"success": True, "commitOid": new, "pullRequestUrl": None,
                                        "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{new}"})

        return Handler


def _commit_sha(files: dict[str, bytes], parent: str) -> str:
    h = hashlib.sha1(parent.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
    return h.hexdigest()


def _blob_id(data: bytes) -> str:
    """The git blob id of a file, as the Hub reports it for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def point_client_at(server: FakeHub, monkeypatch, cache: str, token: str = "tok-alice") -> None:
    """Make ``huggingface_hub`` in this process talk to ``server`` as the user of ``token``,
    with its download cache in ``cache`` (undone by ``monkeypatch``)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_TOKEN", token)
