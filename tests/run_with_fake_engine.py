"""`python tests/run_with_fake_engine.py <stage> [variant]`: run a stage entry with the FakeEngine,
each engine call taking FAKE_ENGINE_DELAY seconds, so that a test can kill it mid-run."""

from __future__ import annotations

import importlib
import os
import sys

from stages.core.config.cli import run
from stages.core.runtime import executors
from tests.conftest import FakeEngine

if __name__ == "__main__":
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    delay = float(os.environ.get("FAKE_ENGINE_DELAY", "0"))
    executors.make_engine = lambda llm, options: FakeEngine(llm=llm, options=options, delay=delay)
    sys.argv = [f"stages.{sys.argv[1]}", *sys.argv[2:]]
    run(stage.main)
