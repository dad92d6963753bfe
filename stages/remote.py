"""remote check: whether each DVC remote answers, before a push or pull that would otherwise fail
after minutes with DVC's "unexpected error".

For each S3 remote (all of the DVC config, or those named with --remote) it reads the remote as
DVC resolves it (.dvc/config and .dvc/config.local: url, endpointurl, credentials) and lists one
key of its prefix, with short timeouts. A remote that answers prints "remote NAME: s3://bucket/prefix
at ENDPOINT reachable"; one that does not prints one line naming the remote, bucket, endpoint and
the fix (an unreachable endpoint, no or wrong credentials, access denied, no such bucket) and the
command exits with status 2. No secret is printed. Not a DVC stage: `make remote-check`, and
`make release` before it pushes (scripts/release.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stages.core.config.cli import EXIT_EXPECTED, TRACEBACK_ENV, run, summary
from stages.core.storage.remote import RemoteError, check_all, remotes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.remote", description=summary(__doc__))
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="check that each remote answers (exit status 2 if not)")
    checking.add_argument(
        "--remote", action="append", metavar="NAME", help="a remote to check (repeatable); default: all"
    )
    args = parser.parse_args(argv)
    failed = False
    for result in check_all(remotes(Path.cwd(), args.remote)):
        if isinstance(result, RemoteError):
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise result
            print(f"error: {result}", file=sys.stderr)
            failed = True
        else:
            print(result)
    if failed:
        sys.exit(EXIT_EXPECTED)


if __name__ == "__main__":
    run(main)
