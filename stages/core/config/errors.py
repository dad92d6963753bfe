"""The project's error type: an expected failure that the entry point reports as a few plain lines."""

from __future__ import annotations


class PipelineError(Exception):
    """Bad params, a bad or missing input, a wrong key, a missing credential: something the user fixes.

    Entry points print its message (which names the key, file or shard and the fix) and exit with
    status 2, without a traceback; LMSYS_SYNTH_TRACEBACK=1 shows it. Any other exception is a bug
    and keeps its traceback.
    """


class SourceError(PipelineError, ValueError):
    """A source or intermediate file is missing, unreadable, or lacks what the stage needs."""
