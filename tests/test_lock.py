"""The dependency locks (requirements/*.lock, `make lock`) against pyproject.toml: each pin meets every
requirement of the extras its lock was compiled for, no pin is left from a removed requirement, and
torch is the CPU build. Offline: reads the files only."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from stages.core.release.provenance import LOCKS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "lmsys-chat-1m-synth"
VIA_PROJECT = f"{PROJECT} (pyproject.toml)"
# marker values of the `uv pip compile --python-platform` targets the Makefile uses
PLATFORMS = {
    "x86_64-unknown-linux-gnu": {
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# "# via a" or, one a line after "# via", "#   a"; a constraints file ("-c f") is no reason to install
VIA = re.compile(r"^\s+#\s+(?:via\s+)?(?!via$|-c )(\S.*)$")


@dataclass
class Pin:
    version: Version
    hashed: bool = False
    via: set[str] = field(default_factory=set)  # names that require it, or VIA_PROJECT


@dataclass
class Lock:
    command: list[str]  # the `uv pip compile` arguments the header records
    pins: dict[str, Pin]

    def options(self, flag: str) -> list[str]:
        return [self.command[i + 1] for i, arg in enumerate(self.command[:-1]) if arg == flag]

    def environment(self) -> dict[str, str]:
        """The marker environment the lock was compiled for, from its --python-version and
        --python-platform."""
        (python,) = self.options("--python-version")
        (platform,) = self.options("--python-platform")
        if platform not in PLATFORMS:
            raise ValueError(f"--python-platform {platform}: no marker values here; known: {list(PLATFORMS)}")
        full = python if python.count(".") == 2 else f"{python}.0"
        return {
            **PLATFORMS[platform],
            "python_version": ".".join(python.split(".")[:2]),
            "python_full_version": full,
            "implementation_name": "cpython",
            "implementation_version": full,
            "platform_python_implementation": "CPython",
        }


def parse_lock(text: str) -> Lock:
    """A lock written by `uv pip compile --generate-hashes` (annotations on): header command, pins,
    whether each has hashes, and the `# via` names of each."""
    command: list[str] = []
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if not command and line.startswith("#") and "uv pip compile" in line:
            command = shlex.split(line.split("uv pip compile", 1)[1])
        elif match := PIN.match(line):
            current = pins[canonicalize_name(match[1])] = Pin(Version(match[2]))
        elif current is not None and line.strip().startswith("--hash="):
            current.hashed = True
        elif current is not None and (match := VIA.match(line)):
            current.via.add(match[1] if match[1] == VIA_PROJECT else canonicalize_name(match[1]))
    return Lock(command, pins)


def requirements(pyproject: dict, extras: list[str], environment: dict[str, str]) -> list[Requirement]:
    """pyproject's core requirements and those of `extras`, keeping those whose marker holds there."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"the lock was compiled with extras {unknown} that pyproject.toml does not define")
    found = [Requirement(text) for text in project["dependencies"]]
    found += [Requirement(text) for extra in extras for text in optional[extra]]
    return [r for r in found if r.marker is None or r.marker.evaluate({**environment, "extra": ""})]


def unmet(required: list[Requirement], lock: Lock) -> list[str]:
    """Each requirement that no pin of the lock meets, with the pin (or its absence)."""
    problems = []
    for req in required:
        pin = lock.pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req}: not pinned")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req}: pinned {pin.version}")
    return problems


def stale(required: list[Requirement], lock: Lock) -> list[str]:
    """Pins that nothing requires any more: a top-level pin (`via` the project) whose name pyproject
    no longer asks for, and any pin reached only through such pins."""
    names = {canonicalize_name(r.name) for r in required}
    reached = {name for name, pin in lock.pins.items() if VIA_PROJECT in pin.via and name in names}
    grew = True
    while grew:
        more = {name for name, pin in lock.pins.items() if name not in reached and pin.via & reached}
        reached |= more
        grew = bool(more)
    return sorted(f"{name}=={lock.pins[name].version}" for name in set(lock.pins) - reached)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _lock(path: str) -> Lock:
    lock = parse_lock((ROOT / path).read_text(encoding="utf-8"))
    assert lock.command, f"{path}: no `uv pip compile` command in its header; run `make lock`"
    return lock


@pytest.mark.parametrize("path", LOCKS)
def test_every_requirement_of_the_locked_extras_is_met_by_its_pin(path):
    lock = _lock(path)
    required = requirements(_pyproject(), lock.options("--extra"), lock.environment())
    problems = unmet(required, lock)
    assert not problems, f"{path} is out of date with pyproject.toml; run `make lock`"


@pytest.mark.parametrize("path", LOCKS)
def test_every_pin_is_still_required(path):
    lock = _lock(path)
    required = requirements(_pyproject(), lock.options("--extra"), lock.environment())
    problems = stale(required, lock)
    assert not problems, f"{path} pins what pyproject.toml no longer requires; run `make lock`"


@pytest.mark.parametrize("path", LOCKS)
def test_every_pin_has_hashes_and_torch_is_the_cpu_build(path):
    pins = _lock(path).pins
    assert not [name for name, pin in pins.items() if not pin.hashed]  # make installs --require-hashes
    assert pins["torch"].version.local == "cpu"
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]


def test_the_demo_lock_is_the_test_lock_less_the_test_extras():
    """make installs the test lock over the demo lock: it must only add packages."""
    demo, test = _lock("requirements/demo.lock"), _lock("requirements/test.lock")
    assert set(demo.options("--extra")) <= set(test.options("--extra"))
    assert demo.environment() == test.environment()
    moved = {n: (str(p.version), str(test.pins[n].version)) for n, p in demo.pins.items() if n in test.pins}
    assert {n: v for n, v in moved.items() if v[0] != v[1]} == {}
    assert sorted(set(demo.pins) - set(test.pins)) == []


LOCK_TEXT = """\
# This file was autogenerated by uv via the following command:
#    uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
--extra cpu -o requirements/demo.lock
--find-links /opt/wheels

numpy==2.4.6 \\
    --hash=sha256:00
    # via
    #   -c requirements/test.lock
    #   pandas
pandas==2.2.0 \\
    --hash=sha256:01
    # via lmsys-chat-1m-synth (pyproject.toml)
torch==2.13.0+cpu \\
    --hash=sha256:02
    # via lmsys-chat-1m-synth (pyproject.toml)
"""


def _toml(core: list[str], cpu: list[str]) -> dict:
    return {"project": {"dependencies": core, "optional-dependencies": {"cpu": cpu}}}


def test_parse_lock_reads_the_header_pins_hashes_and_via():
    lock = parse_lock(LOCK_TEXT)
    assert lock.options("--extra") == ["cpu"]
    assert lock.environment()["python_full_version"] == "3.11.0"
    assert lock.pins["torch"].version == Version("2.13.0+cpu")
    assert lock.pins["numpy"].via == {"pandas"}  # the constraints file is no reason
    assert lock.pins["pandas"].via == {VIA_PROJECT}
    assert all(pin.hashed for pin in lock.pins.values())


@pytest.mark.parametrize(
    ("core", "cpu", "problems"),
    [
        (["pandas>=2.2"], ["torch==2.13.0"], []),
        (["pandas>=3.1"], ["torch==2.13.0"], ["pandas>=3.1: pinned 2.2.0"]),
        (["pandas>=2.2", "orjson>=3.10"], ["torch==2.13.0"], ["orjson>=3.10: not pinned"]),
        (["pandas>=2.2", "uvloop; sys_platform == 'win32'"], ["torch==2.13.0"], []),  # not for the target
        (["pandas>=2.2"], ["torch==2.14.0"], ["torch==2.14.0: pinned 2.13.0+cpu"]),
    ],
)
def test_unmet_names_each_requirement_the_lock_misses(core, cpu, problems):
    lock = parse_lock(LOCK_TEXT)
    assert unmet(requirements(_toml(core, cpu), ["cpu"], lock.environment()), lock) == problems


def test_stale_names_a_removed_requirement_and_what_only_it_pulled_in():
    lock = parse_lock(LOCK_TEXT)
    assert stale(requirements(_toml(["pandas"], ["torch"]), ["cpu"], lock.environment()), lock) == []
    left = requirements(_toml([], ["torch"]), ["cpu"], lock.environment())
    assert stale(left, lock) == ["numpy==2.4.6", "pandas==2.2.0"]


def test_an_extra_that_pyproject_lacks_is_named():
    with pytest.raises(ValueError, match=r"\['gpu'\]"):
        requirements(_toml([], []), ["gpu"], parse_lock(LOCK_TEXT).environment())
