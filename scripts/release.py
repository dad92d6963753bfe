"""`python -m scripts.release <variant> <tag>`: build one variant's release and everything made from it,
check that nothing of it is stale, push its data, then commit and tag (`make release`).

The steps, each stopping the release with its command's own message when it fails:
1. `python -m stages.compose --check`: params.yaml is conf/'s composition; unless --no-push,
   `python -m stages.remote check` of the remotes the push writes to (endpoint, credentials, bucket);
2. `dvc repro package@V sft@V merge@V compare@V`: the release, its SFT files, the merged private file and
   the comparison with the published file, so the tag never carries the previous release's figures;
3. `dvc status` of those stages is clean (nothing changed while they ran);
4. the remote check again, `dvc push --with-deps` of those stages and `dvc push --run-cache` (skipped
   with --no-push); a failed push runs the check once more to name the cause;
5. `git add params.yaml dvc.lock data/metrics`, `git commit`, `git tag`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages.core.config.cli import summary
from stages.core.storage.remote import RemoteError, pushed_remotes

CHAIN = ("package", "sft", "merge", "compare")  # what `dvc repro package@V` alone leaves stale


class ReleaseError(RuntimeError):
    """A step failed: its command and what it printed."""


def step(*command: str) -> str:
    """Run one step, echoing it; its stdout, or ReleaseError with its output."""
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ReleaseError(
            f"`{' '.join(command)}` failed (status {done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def remote_check(targets: list[str]) -> list[str]:
    """The command that checks each remote `dvc push --with-deps <targets>` and `dvc push --run-cache`
    write to (`python -m stages.remote check`: endpoint, credentials, bucket)."""
    try:
        names = pushed_remotes(Path.cwd(), targets)
    except RemoteError as err:
        raise ReleaseError(str(err)) from err
    return [sys.executable, "-m", "stages.remote", "check", *(f"--remote={name}" for name in names)]


def push_data(targets: list[str], check: list[str]) -> None:
    """Check the remotes again (credentials may have expired while the chain ran), then push; a failed
    push is checked once more, so its error names the remote, bucket, endpoint and fix beside DVC's
    "unexpected error"."""
    step(*check)
    try:
        step("dvc", "push", "--with-deps", *targets)
        step("dvc", "push", "--run-cache")
    except ReleaseError as err:
        done = subprocess.run(check, capture_output=True, text=True)
        cause = done.stderr.strip() if done.returncode else "the remotes answer the check: see dvc's output"
        raise ReleaseError(f"{err}\n{' '.join(['python', *check[1:]])}: {cause}") from err


def release(variant: str, tag: str, message: str | None, push: bool) -> None:
    targets = [f"{stage}@{variant}" for stage in CHAIN]
    step(sys.executable, "-m", "stages.compose", "--check")
    check = remote_check(targets) if push else []
    if push:
        step(*check)  # a missing endpoint or credential stops the release now, not after the build
    step("dvc", "repro", *targets)
    stale = json.loads(step("dvc", "status", "--json", *targets) or "{}")
    if stale:
        raise ReleaseError(f"still stale after dvc repro (changed while it ran?): {', '.join(stale)}")
    if push:
        push_data(targets, check)
    step("git", "add", "params.yaml", "dvc.lock", "data/metrics")
    step("git", "commit", "--allow-empty", "-m", message or f"{variant}: release {tag}")
    step("git", "tag", tag)
    print(f"{tag}: {variant} released (git push --tags to share it)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.release", description=summary(__doc__))
    parser.add_argument("variant", help="a key of `models` in params.yaml, e.g. gemma3")
    parser.add_argument("tag", help="the git tag of the release, e.g. v0.2")
    parser.add_argument("--message", help="the commit message (default: '<variant>: release <tag>')")
    parser.add_argument("--no-push", action="store_true", help="build, check, commit and tag; push nothing")
    args = parser.parse_args(argv)
    try:
        release(args.variant, args.tag, args.message, not args.no_push)
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
