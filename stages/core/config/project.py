"""This project's name and the installed versions of distributions (a release records both)."""

from __future__ import annotations

from importlib import metadata

PROJECT = "lmsys-chat-1m-synth"


def distribution_version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None where it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
