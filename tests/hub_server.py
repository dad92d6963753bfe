"""A Hugging Face Hub stand-in on 127.0.0.1: the endpoints that huggingface_hub 2.4.0's `create_repo` and
`create_commit` call for a dataset repository (tests/test_publish.py), and those its `HfFileSystem` calls to
list and read a dataset's files at a revision (tests/test_fetch.py), over HTTP/1.1.

    GET  /api/agent-harnesses                              the client's agent registry (no token), empty
    POST /api/repos/create                                 create_repo (409 with the url when it exists)
    POST /api/validate-yaml                                create_commit checks README.md's metadata
    POST /api/datasets/<repo>/preupload/<rev>              upload mode (lfs or regular) and the oid held
    POST /datasets/<repo>.git/info/lfs/objects/batch       an upload action only for a blob it lacks
    PUT  /lfs/<repo>/<oid>                                 the basic transfer (a presigned URL: no token)
    POST /datasets/<repo>.git/info/lfs/objects/verify      the blob is stored with that size
    POST /api/datasets/<repo>/commit/<rev>                 the commit, one ndjson request, applied whole
    GET  /api/datasets/<repo>/revision/<rev>               repo_info: the commit's sha and siblings
    GET  /api/datasets/<repo>/tree/<rev>[/<path>]          list_repo_tree (?recursive=&expand=), one page
    POST /api/datasets/<repo>/paths-info/<rev>             get_paths_info (a form: paths=...&expand=...)
    HEAD /datasets/<repo>/resolve/<rev>/<path>             a file's metadata (X-Repo-Commit, ETag, size)
    GET  /datasets/<repo>/resolve/<rev>/<path>             a file's bytes (a Range: 206 partial content)

A read's <rev> is `main` (the last commit) or a 40-hex commit of the repository: each commit keeps the files
it had (`Repo.trees`), so a commit revision reads the same bytes whatever is pushed later. `HubServer.push`
commits files directly, as a dataset already on the Hub. Errors carry the X-Error-Code that the client turns
into RepositoryNotFoundError, RevisionNotFoundError or EntryNotFoundError. Every request is counted in
`requests` as (method, path); `downloads()` lists the resolve GETs, the requests that send a file's bytes.

Xet: huggingface_hub 2.4.0 picks Xet on the client for an upload (hf_xet installed and HF_HUB_DISABLE_XET
unset) and no server answer turns it back to LFS, so the publish tests set HF_HUB_DISABLE_XET=1. A listing
here gives no xetHash, so reads go over the resolve URLs whatever HF_HUB_DISABLE_XET. Every request but the
blob PUT must carry `Authorization: Bearer <token>`. The server counts blob uploads by oid and can fail the
n-th blob upload or the first commit once, as an interrupted run would."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_LIMIT = 10 << 20  # a file this large is LFS whatever its type
# a part of the .gitattributes the Hub writes into a new repository
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.arrow", "*.bin", "*.gz", "*.parquet", "*.zip", "*.zst", "*.tar")
)
COMMIT_DATE = "2024-01-01T00:00:00.000Z"  # every commit's date in a listing's lastCommit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=lambda: {".gitattributes": GITATTRIBUTES.encode()})
    lfs: set[str] = field(default_factory=set)  # the paths stored as LFS pointers
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256
    commits: list[dict] = field(default_factory=lambda: [{"oid": "0" * 40, "summary": "initial commit"}])
    trees: dict[str, tuple[dict[str, bytes], frozenset[str]]] = field(default_factory=dict)  # (files, lfs)

    def __post_init__(self) -> None:
        self.trees.setdefault(self.commits[-1]["oid"], (dict(self.files), frozenset(self.lfs)))

    def oid(self, path: str) -> str:
        """The preupload oid of a file held: sha256 for LFS, the git blob sha1 otherwise."""
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)

    def lfs_patterns(self) -> list[str]:
        text = self.files.get(".gitattributes", b"").decode()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def commit_of(self, revision: str) -> str | None:
        """The commit a read's revision names: `main`'s last, or a commit by its oid; None if neither."""
        if revision == "main":
            return self.commits[-1]["oid"]
        return revision if revision in self.trees else None

    def entry(self, commit: str, path: str, expand: bool) -> dict | None:
        """`path`'s entry in a tree listing or paths-info at `commit`, as the Hub writes it: a file (with
        its LFS pointer's details where it is LFS) or a directory; None where the commit has neither."""
        files, lfs = self.trees[commit]
        if path in files:
            data = files[path]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if path in lfs:
                pointer = lfs_pointer(data)
                sha256 = hashlib.sha256(data).hexdigest()
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
        else:
            below = sorted((p, git_blob_sha1(files[p])) for p in files if p.startswith(f"{path}/"))
            if not path or not below:
                return None
            tree = hashlib.sha1(json.dumps(below).encode()).hexdigest()
            entry = {"type": "directory", "oid": tree, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(commit, path)
        return entry

    def tree(self, commit: str, path: str, recursive: bool, expand: bool) -> list[dict] | None:
        """The entries below directory `path` ("" the root) at `commit`: its children, or with `recursive`
        every file and directory below it; None where `path` is no directory."""
        prefix = f"{path}/" if path else ""
        below = [p[len(prefix) :].split("/") for p in self.trees[commit][0] if p.startswith(prefix)]
        if path and not below:
            return None
        names = {prefix + "/".join(parts[:depth]) for parts in below for depth in range(1, len(parts) + 1)}
        if not recursive:
            names = {prefix + parts[0] for parts in below}
        entries = [self.entry(commit, name, expand) for name in sorted(names)]
        return [e for e in entries if e is not None]

    def _last_commit(self, commit: str, path: str) -> dict:
        """The last commit up to `commit` that changed `path` (a file, or any file below a directory)."""
        found, before = self.commits[0], None
        for item in self.commits:
            files = self.trees[item["oid"]][0]
            now = {p: d for p, d in files.items() if p == path or p.startswith(f"{path}/")}
            if now != before:
                found, before = item, now
            if item["oid"] == commit:
                break
        return {"id": found["oid"], "title": found.get("summary", ""), "date": COMMIT_DATE}


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git holds for an LFS file."""
    sha256 = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()


def _is_lfs(patterns: list[str], path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub stores a file as LFS: a large or binary one, or one .gitattributes names."""
    return size >= LFS_LIMIT or _binary(sample) or any(fnmatch.fnmatch(path, p) for p in patterns)


def _flag(values: dict[str, list[str]], key: str) -> bool:
    """A boolean of a query or form (`true`/`false`, as httpx writes True/False)."""
    return values.get(key, ["false"])[0].lower() in ("true", "1")


def _binary(sample: bytes) -> bool:
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start < len(sample) - 3  # not a character cut at the sample's end
    return b"\0" in sample


class HubServer(ThreadingHTTPServer):
    """The stand-in: `repos` by id, `requests` as (method, path), `uploads` (blob PUTs stored, by oid)."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.uploads: Counter = Counter()
        self.fail_upload: int | None = None  # refuse the n-th blob PUT (1-based), once
        self.fail_commit = False  # answer the next commit 500, once
        self.puts = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()

    def push(self, repo_id: str, files: dict[str, bytes], summary: str = "Upload files") -> str:
        """Commit `files` (path -> bytes, added or replaced) to dataset `repo_id`'s main, creating a
        private repository where there is none, as a dataset already on the Hub; return the commit's oid."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=True))
            patterns = repo.lfs_patterns()
            held, lfs = dict(repo.files), set(repo.lfs)
            for path, data in sorted(files.items()):
                held[path] = data
                if _is_lfs(patterns, path, len(data), data[:512]):
                    lfs.add(path)
                    repo.blobs[hashlib.sha256(data).hexdigest()] = data
                else:
                    lfs.discard(path)
            digests = sorted((path, hashlib.sha256(data).hexdigest()) for path, data in files.items())
            oid = hashlib.sha1(json.dumps([repo.commits[-1]["oid"], digests, summary]).encode()).hexdigest()
            repo.files, repo.lfs = held, lfs
            repo.commits.append({"oid": oid, "summary": summary})
            repo.trees[oid] = (held, frozenset(lfs))
        return oid

    def downloads(self) -> list[tuple[str, str, str]]:
        """The GET requests for a file's bytes (`/datasets/<repo>/resolve/<rev>/<path>`), in order, each as
        (repo id, revision, path in the repository), unquoted."""
        with self.lock:
            requests = list(self.requests)
        return [parts for method, url in requests if method == "GET" and (parts := _resolve_parts(url))]


def _resolve_parts(url: str) -> tuple[str, str, str] | None:
    """(repo id, revision, path in repo) of a resolve URL of a dataset; None for any other URL."""
    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) < 6 or parts[0] != "datasets" or parts[3] != "resolve":
        return None
    return f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, body: dict | list | None = None, error: str | None = None, code: str | None = None
    ) -> None:
        data = json.dumps(body if body is not None else {"error": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error is not None:
            self.send_header("X-Error-Message", error)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self, method: str) -> None:
        body = self._body()
        with self.server.lock:
            self.server.requests.append((method, self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        if method == "PUT" and parts[0] == "lfs":
            return self._put_blob("/".join(parts[1:3]), parts[3], body)
        if (method, "/".join(parts)) == ("GET", "api/agent-harnesses"):
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._send(401, error="Invalid credentials in Authorization header")
        path = "/".join(parts)
        if (method, path) == ("POST", "api/repos/create"):
            return self._create(json.loads(body))
        if (method, path) == ("POST", "api/validate-yaml"):
            return self._validate_yaml(json.loads(body))
        reads = {("GET", "revision"), ("GET", "tree"), ("POST", "paths-info")}
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and (method, parts[4]) in reads:
            return self._read_api(parts[4], "/".join(parts[2:4]), unquote(parts[5]), parts[6:], body)
        if method in ("GET", "HEAD") and (resolved := _resolve_parts(self.path)) is not None:
            return self._resolve(*resolved)
        if parts[:2] == ["api", "datasets"] and len(parts) == 6:
            return self._repo_api(method, "/".join(parts[2:4]), parts[4], parts[5], body)
        if method == "POST" and parts[0] == "datasets" and parts[2].endswith(".git") and len(parts) == 7:
            return self._lfs(parts[-1], f"{parts[1]}/{parts[2].removesuffix('.git')}", json.loads(body))
        return self._send(404, error=f"no route for {method} {self.path}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _create(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = {"url": f"{self.server.url}/datasets/{repo_id}"}
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._send(409, {**url, "error": "You already created this dataset repo"})
            self.server.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {**url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        text = payload["content"]
        if text.startswith("---\n"):
            try:
                yaml.safe_load(text[4 : text.index("\n---\n", 3)])
            except (ValueError, yaml.YAMLError) as err:
                return self._send(400, {"errors": [{"message": f"invalid metadata: {err}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _repo_api(self, method: str, repo_id: str, action: str, revision: str, body: bytes) -> None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._send(404, error="Repository not found")
        if revision != "main":
            return self._send(404, error=f"Invalid rev id: {revision}")
        if (method, action) == ("POST", "preupload"):
            return self._send(200, {"files": [self._mode(repo, f) for f in json.loads(body)["files"]]})
        if (method, action) == ("POST", "commit"):
            return self._commit(repo_id, repo, body)
        return self._send(404, error=f"no route for {method} {self.path}")

    def _commit_at(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        """The repository and the commit a read names; None, the 404 sent, where there is no such."""
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._send(404, error="Repository not found", code="RepoNotFound")
            return None
        commit = repo.commit_of(revision)
        if commit is None:
            self._send(404, error=f"Invalid rev id: {revision}", code="RevisionNotFound")
            return None
        return repo, commit

    def _read_api(self, action: str, repo_id: str, revision: str, rest: list[str], body: bytes) -> None:
        """repo_info (`revision`), list_repo_tree (`tree`) and get_paths_info (`paths-info`) at a revision."""
        found = self._commit_at(repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        query = parse_qs(urlsplit(self.path).query)
        if action == "revision":
            siblings = [{"rfilename": path} for path in sorted(repo.trees[commit][0])]
            info = {"id": repo_id, "private": repo.private, "sha": commit, "siblings": siblings}
            return self._send(200, info)
        if action == "tree":
            path = unquote("/".join(rest)).strip("/")
            entries = repo.tree(commit, path, _flag(query, "recursive"), _flag(query, "expand"))
            if entries is None:
                return self._send(404, error=f"{path} does not exist on {revision}", code="EntryNotFound")
            return self._send(200, entries)
        form = parse_qs(body.decode())
        expand = _flag(form, "expand")
        entries = [repo.entry(commit, path.strip("/"), expand) for path in form.get("paths", [])]
        return self._send(200, [e for e in entries if e is not None])

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        """A file's bytes (GET) or headers (HEAD) at a revision, whole or the one byte range asked for."""
        found = self._commit_at(repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        files, lfs = repo.trees[commit]
        if path not in files:
            return self._send(404, error=f"{path} does not exist on {revision}", code="EntryNotFound")
        data = files[path]
        size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{sha256 if path in lfs else git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if path in lfs:  # the Hub names an LFS file's blob (and redirects to it): served here directly
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size)})
        status, body = 200, data
        asked = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if asked and any(asked.groups()):  # one range; several, or none that parses, get the whole file
            first, last = asked.groups()
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size or start > end:
                headers["Content-Range"] = f"bytes */{size}"
                status, body = 416, b""
            else:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                status, body = 206, data[start : end + 1]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
        return None

    @staticmethod
    def _mode(repo: Repo, file: dict) -> dict:
        path, sample = file["path"], base64.b64decode(file["sample"])
        lfs = _is_lfs(repo.lfs_patterns(), path, file["size"], sample)
        oid = repo.oid(path) if path in repo.files else None
        return {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}

    def _lfs(self, action: str, repo_id: str, payload: dict) -> None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._send(404, error="Repository not found")
        if action == "verify":
            held = repo.blobs.get(payload["oid"])
            if held is None or len(held) != payload["size"]:
                return self._send(404, error=f"object {payload['oid']} not found")
            return self._send(200, {})
        if action != "batch":
            return self._send(404, error=f"no LFS route {action}")
        objects = []
        for obj in payload["objects"]:
            if obj["oid"] in repo.blobs:  # held: no actions, the client skips it
                objects.append({"oid": obj["oid"], "size": obj["size"]})
                continue
            verify = f"{self.server.url}/datasets/{repo_id}.git/info/lfs/objects/verify"
            upload = {"href": f"{self.server.url}/lfs/{repo_id}/{obj['oid']}"}
            objects.append(
                {**obj, "authenticated": True, "actions": {"upload": upload, "verify": {"href": verify}}}
            )
        self._send(200, {"transfer": "basic", "objects": objects})

    def _put_blob(self, repo_id: str, oid: str, data: bytes) -> None:
        with self.server.lock:
            self.server.puts += 1
            if self.server.puts == self.server.fail_upload:
                return self._send(403, error="simulated interruption: upload refused")
            if hashlib.sha256(data).hexdigest() != oid:
                return self._send(400, error="sha256 of the body is not the oid")
            self.server.repos[repo_id].blobs[oid] = data
            self.server.uploads[oid] += 1
        self._send(200, {})

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.server.lock:
            if self.server.fail_commit:
                self.server.fail_commit = False
                return self._send(500, error="simulated interruption: commit failed")
            files, lfs = dict(repo.files), set(repo.lfs)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif line["key"] == "lfsFile" and value["oid"] in repo.blobs:
                    files[value["path"]] = repo.blobs[value["oid"]]
                    lfs.add(value["path"])
                else:
                    return self._send(422, error=f"cannot apply {line['key']} {value.get('path')}")
            oid = hashlib.sha1(json.dumps([repo.commits[-1]["oid"], lines]).encode()).hexdigest()
            repo.files, repo.lfs = files, lfs
            repo.commits.append({"oid": oid, **lines[0]["value"]})
            repo.trees[oid] = (files, frozenset(lfs))
        url = f"{self.server.url}/datasets/{repo_id}/commit/{oid}"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})
