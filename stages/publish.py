"""Publish a built release to a Hugging Face dataset repository: its public files, dataset card and
manifest, in one commit (not a DVC stage; docs/publishing.md).

    python -m stages.publish <variant> --repo <org>/<name> [--dry-run]

The licence guard (stages/core/release/guard.py) checks every file first: its content against the
private instructions, the directory against dvc.lock, the .gpg by its packets and a trial decryption
(docs/security.md); when it refuses any, it names each in one line and nothing is sent. --dry-run
lists what would be uploaded (path, size, sha256) and sends no request. A run cut short is resumed by
running it again: blobs the Hub already holds are not uploaded twice."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from stages.core.config.cli import LOG_FORMAT, run
from stages.core.config.params import load_params
from stages.core.release import guard, hub
from stages.core.storage.jsonl import sha256_file

LOG = logging.getLogger("stages.publish")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.publish", description=__doc__.splitlines()[0])
    parser.add_argument("variant", help="a key of `models` in params.yaml, e.g. gemma3")
    parser.add_argument("--repo", required=True, help="the Hub dataset repository, <org>/<name>")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for client in ("httpx", "httpx2"):  # each request's URL: a presigned upload URL is a credential
        logging.getLogger(client).setLevel(logging.WARNING)
    params = load_params()
    params.variant(args.variant)
    hub.check_repo_id(args.repo)
    began, root = time.perf_counter(), Path.cwd()
    uploads, manifest = guard.publishable(params, args.variant, root)
    release = root / params.paths.release_of(args.variant)
    summary, description = hub.commit_text(
        args.variant, sha256_file(release / guard.MANIFEST), manifest, hub.git_revision(root)
    )
    size = sum(u.size for u in uploads)
    if args.dry_run:
        for upload in uploads:
            sys.stdout.write(f"{upload.sha256}  {upload.size:>15,}  {upload.name}\n")
        LOG.info(
            "dry run: would commit %d files (%s bytes) to %s: %s",
            len(uploads),
            f"{size:,}",
            args.repo,
            summary,
        )
        return
    done = hub.publish(args.repo, uploads, summary, description)
    LOG.info(
        "%s %d files (%s bytes) of %s to %s in %.1f s: %s",
        "published" if done.new else "nothing to commit: main already holds the",
        len(uploads),
        f"{size:,}",
        release,
        args.repo,
        time.perf_counter() - began,
        done.url,
    )
    for upload in uploads:
        LOG.info("  %s  %s B  sha256 %s", upload.name, f"{upload.size:,}", upload.sha256)
    if done.untouched:  # e.g. another variant's files: one repository per variant (docs/publishing.md)
        LOG.warning(
            "%s also holds files this release does not (left as they are): %s", args.repo, done.untouched
        )


if __name__ == "__main__":
    run(main)
