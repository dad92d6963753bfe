"""Upload a release's checked files (guard.publishable) to a Hugging Face dataset repository in one
commit with huggingface_hub, and write the commit's message from the release's manifest.

The repository is created private when it does not exist (visibility and gating are the team's call, on
the Hub). `create_commit` asks the Hub which blobs it holds (preupload, then the LFS batch, or Xet's
chunk dedup when hf_xet is installed) and sends only the others, so a run cut short is resumed by
running it again; the commit itself is one request, made after every blob is up. The token is
huggingface_hub's (HF_TOKEN, else `hf auth login`); it is never logged."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stages.core.config.errors import PipelineError
from stages.core.release.guard import MANIFEST, Upload
from stages.core.storage.source import CLIENT_ERRORS

if TYPE_CHECKING:
    from huggingface_hub.errors import HfHubHTTPError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
TOKENS = "https://huggingface.co/settings/tokens"
RESUME = "Run the same command again: blobs the Hub already holds are not uploaded again."
HINTS = {
    401: "the token (HF_TOKEN, or `hf auth login`) is not valid",
    403: f"the token may not write there: use a write token of an account that may ({TOKENS})",
    404: "no such repository, or the token cannot see it",
}


class HubError(PipelineError, ConnectionError):
    """The Hub refused a request or could not be reached; names the repository and the fix."""


def check_repo_id(repo: str) -> None:
    if not REPO_ID.fullmatch(repo):
        raise PipelineError(f"--repo {repo!r}: expected <organisation or user>/<dataset name>")


def git_revision(root: Path) -> str | None:
    """`git describe --tags --always --dirty` of the checkout in `root` (a tag when HEAD is tagged)."""
    try:
        done = subprocess.run(
            ["git", "describe", "--tags", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def commit_text(variant: str, manifest_sha256: str, manifest: dict, revision: str | None) -> tuple[str, str]:
    """The commit's summary (variant, git revision, manifest digest) and description (provenance, files)."""
    code = manifest["provenance"]["code"]
    summary = (
        f"Publish {variant} ({manifest['release_name']}) at {revision or 'no git revision'}, "
        f"{MANIFEST} sha256 {manifest_sha256[:16]}"
    )
    lines = [
        f"variant: {variant}; subset: {manifest['subset']}",
        f"git revision of the checkout: {revision or 'none (not a git checkout)'}",
        f"{MANIFEST} sha256: {manifest_sha256}",
        f"code commit that built it: {code['git_commit']}",
        f"uncommitted code it was built with: {', '.join(code['uncommitted']) or 'none'}",
        f"params fingerprint: {manifest['provenance']['params_fingerprint']}",
        "",
        *(
            f"{name}: {entry['size']} B, sha256 {entry['sha256']}"
            for name, entry in sorted(manifest["files"].items())
        ),
    ]
    return summary, "\n".join(lines)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's errors for a Hub that cannot be reached (only a loaded client can raise one)."""
    return tuple(
        getattr(sys.modules[module], error)
        for module, (error, _) in CLIENT_ERRORS.items()
        if module in sys.modules
    )


def _cause(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, kinds):
        cause = cause.__cause__ or cause.__context__
    return cause


def _refusal(err: HfHubHTTPError, endpoint: str) -> str:
    """What the Hub refused, and the fix when its API refused it (an upload URL is not the API)."""
    status, request = err.response.status_code, err.response.request
    url = str(request.url).split("?")[0]  # a presigned URL's query is a credential
    detail = err.server_message or str(err).splitlines()[0].split(" for url")[0]
    hint = HINTS.get(status) if url.startswith(f"{endpoint}/api/") else None
    return f"the Hub at {endpoint} answered {status} to {request.method} {url} ({detail})" + (
        f": {hint}" if hint else ""
    )


@contextlib.contextmanager
def hub_errors(repo: str, endpoint: str) -> Iterator[None]:
    """Turn the Hub's refusals and an unreachable Hub into HubError naming the repository and the fix."""
    from huggingface_hub.errors import HfHubHTTPError

    network = _network_errors()
    try:
        yield
    except (HfHubHTTPError, RuntimeError, OSError, *network) as err:
        refused = _cause(err, (HfHubHTTPError,))
        if isinstance(refused, HfHubHTTPError):
            raise HubError(f"{repo}: {_refusal(refused, endpoint)}. {RESUME}") from None
        unreachable = _cause(err, network)
        if unreachable is None:
            raise
        detail = " ".join(f"{type(unreachable).__name__}: {unreachable}".split())
        raise HubError(
            f"{repo}: the Hub at {endpoint} is unreachable ({detail}): check the network or HF_ENDPOINT. "
            + RESUME
        ) from err


@dataclass(frozen=True)
class Published:
    url: str  # the commit's
    new: bool  # False: main already held every file as it is
    untouched: list[str]  # files main holds that the release does not (this commit deletes nothing)


def publish(repo: str, uploads: list[Upload], summary: str, description: str) -> Published:
    """Create the dataset repository `repo` (private) if absent and commit `uploads` to its main branch
    in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if not get_token():
        raise HubError(
            f"no Hugging Face token to write {repo} with: export HF_TOKEN=<a write token> ({TOKENS}) "
            "or run `hf auth login`"
        )
    api = HfApi()
    with hub_errors(repo, api.endpoint or constants.ENDPOINT):
        api.create_repo(repo, repo_type="dataset", private=True, exist_ok=True)
        before = api.repo_info(repo, repo_type="dataset", revision="main")
        operations = [CommitOperationAdd(path_in_repo=u.name, path_or_fileobj=str(u.path)) for u in uploads]
        info = api.create_commit(
            repo,
            operations,
            commit_message=summary,
            commit_description=description,
            repo_type="dataset",
        )
    held = [s.rfilename for s in before.siblings or []]
    untouched = sorted(set(held) - {u.name for u in uploads} - {".gitattributes"})
    return Published(info.commit_url, info.oid != before.sha, untouched)
