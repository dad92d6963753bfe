"""A Hugging Face Hub stand-in on 127.0.0.1 for tests/test_publish.py: just the endpoints that
huggingface_hub 2.4.0's `create_repo` and `create_commit` call for a dataset repository, over HTTP/1.1.

    GET  /api/agent-harnesses                              the client's agent registry (no token), empty
    POST /api/repos/create                                 create_repo (409 with the url when it exists)
    POST /api/validate-yaml                                create_commit checks README.md's metadata
    POST /api/datasets/<repo>/preupload/<rev>              upload mode (lfs or regular) and the oid held
    POST /datasets/<repo>.git/info/lfs/objects/batch       an upload action only for a blob it lacks
    PUT  /lfs/<repo>/<oid>                                 the basic transfer (a presigned URL: no token)
    POST /datasets/<repo>.git/info/lfs/objects/verify      the blob is stored with that size
    POST /api/datasets/<repo>/commit/<rev>                 the commit, one ndjson request, applied whole
    GET  /api/datasets/<repo>/revision/<rev>               repo_info, when there is nothing to commit

Xet: huggingface_hub 2.4.0 picks Xet on the client (hf_xet installed and HF_HUB_DISABLE_XET unset) and no
server answer turns it back to LFS, so the tests set HF_HUB_DISABLE_XET=1. Every request but the blob PUT
must carry `Authorization: Bearer <token>`. The server counts blob uploads by oid and can fail the n-th
blob upload or the first commit once, as an interrupted run would."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

LFS_LIMIT = 10 << 20  # a file this large is LFS whatever its type
# a part of the .gitattributes the Hub writes into a new repository
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.arrow", "*.bin", "*.gz", "*.parquet", "*.zip", "*.zst", "*.tar")
)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=lambda: {".gitattributes": GITATTRIBUTES.encode()})
    lfs: set[str] = field(default_factory=set)  # the paths stored as LFS pointers
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256
    commits: list[dict] = field(default_factory=lambda: [{"oid": "0" * 40, "summary": "initial commit"}])

    def oid(self, path: str) -> str:
        """The preupload oid of a file held: sha256 for LFS, the git blob sha1 otherwise."""
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)

    def lfs_patterns(self) -> list[str]:
        text = self.files.get(".gitattributes", b"").decode()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]


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

    def _send(self, status: int, body: dict | None = None, error: str | None = None) -> None:
        data = json.dumps(body if body is not None else {"error": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error is not None:
            self.send_header("X-Error-Message", error)
        self.end_headers()
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
        if parts[:2] == ["api", "datasets"] and len(parts) == 6:
            return self._repo_api(method, "/".join(parts[2:4]), parts[4], parts[5], body)
        if method == "POST" and parts[0] == "datasets" and parts[2].endswith(".git") and len(parts) == 7:
            return self._lfs(parts[-1], f"{parts[1]}/{parts[2].removesuffix('.git')}", json.loads(body))
        return self._send(404, error=f"no route for {method} {self.path}")

    def do_GET(self) -> None:
        self._route("GET")

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
        if (method, action) == ("GET", "revision"):
            siblings = [{"rfilename": path} for path in sorted(repo.files)]
            return self._send(200, {"id": repo_id, "sha": repo.commits[-1]["oid"], "siblings": siblings})
        return self._send(404, error=f"no route for {method} {self.path}")

    @staticmethod
    def _mode(repo: Repo, file: dict) -> dict:
        path, sample = file["path"], base64.b64decode(file["sample"])
        patterns = repo.lfs_patterns()
        lfs = file["size"] >= LFS_LIMIT or _binary(sample) or any(fnmatch.fnmatch(path, p) for p in patterns)
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
        url = f"{self.server.url}/datasets/{repo_id}/commit/{oid}"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})
