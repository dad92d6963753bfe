"""Key derivation from the LMSYS-Chat-1M files and symmetric gpg encryption with python-gnupg.

The key is a digest of LMSYS files (method hash) or the stdout of the release's key script
(method script). The script's file is read once; those bytes run only when their sha256 is the
pin (decrypt.key.sha256), by bash in a throwaway working directory with PATH, HOME and TMPDIR
(that directory) as its only variables, and, where this machine allows it, in a sandbox:
new user, PID, mount, network and IPC namespaces (util-linux `unshare`, no privilege needed)
whose root holds only read-only system directories (/usr, /etc, ...), PATH's directories outside
HOME, the LMSYS files (read-only) and the working directory (the only writable place); no network
(a loopback that is down), no other process (its own /proc), no HOME, no capabilities, and every
process it started is killed when it ends (its PID namespace ends with it).
The passphrase is never logged nor put in an error message.

gpg always runs with a throwaway home directory (the user's keyring is never read or
written) and python-gnupg hands the passphrase over on a file descriptor
(`--passphrase-fd 0`), never on the command line.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import gnupg
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.config.errors import PipelineError
from stages.core.config.params import load_params
from stages.core.config.source_params import KeySpec
from stages.core.storage.atomic import atomic_path
from stages.core.storage.jsonl import CHUNK

LOG = logging.getLogger(__name__)
CIPHER = "AES256"
STDERR_LINES = 5  # lines of a failed key script's stderr quoted in the error (never its stdout)
STDERR_KEEP = 16 << 10  # bytes of a key script's stderr kept (the last ones): all that its error quotes
WATCH_SECONDS = 0.05  # how often a running key script's processes and time are checked
KILL_GRACE = 5.0  # seconds to collect a killed key script's output
PROBE_TIMEOUT = 30.0  # seconds for the sandbox's trial run
# shown read-only in the sandbox (those that exist), with the directories on PATH outside HOME
SANDBOX_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# new namespaces; --kill-child (it implies --fork): the script's PID 1 dies with unshare
UNSHARE = ("unshare", "--user", "--map-root-user", "--pid", "--kill-child", "--mount", "--net", "--ipc")
# Runs as PID 1 of the namespaces, as root of the user namespace only (this user outside):
#   bash -c SANDBOX_SETUP setup NEW_ROOT HOME WORK SCRIPT READ_ONLY... -- ARGS...
# READ_ONLY: directories bound read-only at their own paths, `:home` where HOME (when one of them
# shows it) is hidden under an empty tmpfs. It builds the root in NEW_ROOT (a tmpfs), makes every
# mount in it read-only but WORK, pivots into it, drops the old root and every capability and
# becomes the key script (then PID 1: when it ends, the kernel kills every process left).
SANDBOX_SETUP = r"""set -euo pipefail
trap 'echo "sandbox setup failed: $BASH_COMMAND" >&2' ERR
keypath=$PATH PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
new=$1 home=$2 work=$3 script=$4
shift 4
mount --make-rprivate /
mount -t tmpfs -o mode=0755 keyscript-root "$new"
while [ "$1" != -- ]; do
  if [ "$1" = :home ]; then
    if [ "$home" != / ] && [ -d "$new$home" ]; then mount -t tmpfs -o mode=0755 keyscript-home "$new$home"; fi
  else
    mkdir -p "$new$(dirname "$1")"
    if [ -L "$1" ]; then
      ln -s "$(readlink "$1")" "$new$1"
    else
      mkdir -p "$new$1"
      mount --rbind "$1" "$new$1"
    fi
  fi
  shift
done
shift
mkdir -p "$new/dev" "$new/proc" "$new$work" "$new/.oldroot"
mount -t tmpfs -o mode=0755 keyscript-dev "$new/dev"
for node in null zero full random urandom; do
  touch "$new/dev/$node"
  mount --bind "/dev/$node" "$new/dev/$node"
done
for fd in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${fd%%:*}" "$new/dev/${fd#*:}"; done
ln -s /proc/self/fd "$new/dev/fd"
mount -t proc -o nosuid,nodev,noexec proc "$new/proc"
while read -r _ _ _ _ mnt _; do
  printf -v mnt %b "$mnt"
  case $mnt in "$new" | "$new"/*) mount -o remount,bind,ro "$mnt" ;; esac
done < /proc/self/mountinfo
mount --bind "$work" "$new$work"
cd "$new"
pivot_root . .oldroot
umount -l /.oldroot
cd "$work"
trap - ERR
exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- \
  env -i PATH="$keypath" HOME="$work" TMPDIR="$work" bash -- "$script" "$@"
"""
# the limit a killed key script broke, as its error says it
BROKE = {
    "timeout": "ran past decrypt.key.timeout={spec.timeout:g} s",
    "max_output_bytes": "printed over decrypt.key.max_output_bytes={spec.max_output_bytes} bytes on stdout",
    "max_processes": "ran more than decrypt.key.max_processes={spec.max_processes} processes at once",
}
__all__ = ["CryptoError", "KeySpec", "decrypt_file", "derive_key", "encrypt_file", "sandbox_missing"]


class CryptoError(PipelineError, RuntimeError):
    """Encryption or decryption failed; no plaintext output was left behind."""


def _digest_column(digest, path: Path, column: str) -> None:
    with pq.ParquetFile(path) as parquet:
        if column not in parquet.schema_arrow.names:
            raise CryptoError(f"decrypt.key.column={column!r} is not a column of {path}")
        for batch in parquet.iter_batches(columns=[column]):
            for value in batch.column(0).cast(pa.string()).to_pylist():
                digest.update(f"{'' if value is None else value}\n".encode())


def derive_key(
    source_root: str | os.PathLike, spec: KeySpec, released_root: str | os.PathLike | None = None
) -> str:
    """Return the passphrase of the released files: a digest of the files of `source_root` that
    match spec.file (method hash), or the trimmed stdout of spec.script under `released_root`
    (method script; None: params.yaml's paths.released)."""
    if spec.method == "script":
        released = Path(load_params().paths.released if released_root is None else released_root)
        return _script_key(Path(source_root), spec, released)
    return _hash_key(Path(source_root), spec)


def _hash_key(root: Path, spec: KeySpec) -> str:
    matches = sorted(p for p in root.glob(spec.file) if p.is_file())
    if not matches:
        raise CryptoError(f"decrypt.key.file={spec.file!r} matches no file under {root}")
    digest = hashlib.new(spec.hash)
    for path in matches:
        if spec.column is not None:
            _digest_column(digest, path, spec.column)
            continue
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    if spec.encoding == "hex":
        return digest.hexdigest()
    return base64.b64encode(digest.digest()).decode("ascii")


class Overrun(NamedTuple):
    """How a key script's run ended: its exit status (None: killed), stdout, the tail of its stderr,
    and the limit it broke, as its params key (None: none)."""

    status: int | None
    out: bytes
    err: bytes
    broke: str | None = None


def _run_isolated(argv: list[str], cwd: str, spec: KeySpec) -> Overrun:
    """Run argv in `cwd`, in a session of its own, with PATH, HOME and TMPDIR (both `cwd`) as its only
    variables and the limits of `spec`: address space (max_memory_mb) and file size (max_file_mb) as
    rlimits (`prlimit`), and, watched here, its run time (timeout), the processes of its session
    (max_processes: RLIMIT_NPROC binds no root-mapped user) and what it prints (at most
    max_output_bytes on stdout; the last STDERR_KEEP bytes of stderr are kept). A broken limit kills
    the whole process group at once; nothing it prints is buffered past those bounds."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": cwd, "TMPDIR": cwd}
    mb = 1 << 20
    limits = [f"--as={spec.max_memory_mb * mb}", f"--fsize={spec.max_file_mb * mb}", "--core=0"]
    pipe = subprocess.PIPE
    with subprocess.Popen(
        ["prlimit", *limits, "--", *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        start_new_session=True,
    ) as proc:
        out, err, broke = _watch(proc, spec)
        if broke is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the script and whatever it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE)
    return Overrun(None if broke is not None else proc.returncode, bytes(out), bytes(err), broke)


def _watch(proc: subprocess.Popen, spec: KeySpec) -> tuple[bytearray, bytearray, str | None]:
    """Read a running key script's stdout and stderr until both close, checking its limits every
    WATCH_SECONDS; return what it printed (stderr: the tail) and the key of the limit it broke."""
    out, err = bytearray(), bytearray()
    deadline, checked = time.monotonic() + spec.timeout, 0.0
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            for key, _ in selector.select(WATCH_SECONDS):
                chunk = os.read(key.fileobj.fileno(), CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is err and len(err) > STDERR_KEEP:
                    del err[: len(err) - STDERR_KEEP]
            if len(out) > spec.max_output_bytes:
                return out[: spec.max_output_bytes], err, "max_output_bytes"
            now = time.monotonic()
            if now > deadline:
                return out, err, "timeout"
            if now - checked >= WATCH_SECONDS:  # not on every read: a busy pipe is read thousands of times
                checked = now
                if _session_size(proc.pid) > spec.max_processes:
                    return out, err, "max_processes"
    return out, err, None


def _session_size(sid: int) -> int:
    """How many processes run in session `sid` (a key script's: every process it started that did not
    start a session of its own, which the sandbox's PID namespace ends with it all the same)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            count += int(fields[3]) == sid  # field 6 of stat: the session id
    return count


def _stderr_tail(err: bytes) -> str:
    lines = [line.rstrip()[:300] for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "its stderr is empty"
    return "its stderr ends:\n  " + "\n  ".join(lines[-STDERR_LINES:])


def _prepare(tmp: Path, name: str, data: bytes) -> tuple[Path, Path]:
    """Lay out a key script's private directory `tmp`: bin/<name> holds `data` (the bytes that run),
    work/ is its working directory, root/ the sandbox's mount point; return (script, work)."""
    for part in ("bin", "work", "root"):
        (tmp / part).mkdir()
    script = tmp / "bin" / name
    script.write_bytes(data)
    return script, tmp / "work"


def _sandbox_argv(tmp: Path, script: Path, source: Path, args: list[str]) -> list[str]:
    """The command that runs `script` (under `tmp`, see _prepare) in the sandbox, `source` read-only."""
    home = Path(os.path.expanduser("~")).resolve()
    shown = [Path(d) for d in SANDBOX_DIRS if os.path.lexists(d)]
    covered = [d.resolve() for d in shown]
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        real = Path(entry).resolve() if os.path.isabs(entry) and os.path.isdir(entry) else None
        if real is not None and not any(real.is_relative_to(d) for d in (*covered, home)):
            shown.append(real)
            covered.append(real)
    ro = [*map(str, shown), ":home", str(script.parent), str(source)]
    paths = [str(tmp / "root"), str(home), str(tmp / "work"), str(script)]
    return [*UNSHARE, "--", "bash", "-c", SANDBOX_SETUP, "keyscript-sandbox", *paths, *ro, "--", *args]


@functools.cache
def sandbox_missing() -> str | None:
    """Why this machine cannot run a key script in the sandbox; None when it can (tried once)."""
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not on PATH"
    with tempfile.TemporaryDirectory(prefix="keyscript-probe-") as tmp:
        script, work = _prepare(Path(tmp).resolve(), "probe.sh", b"exit 0\n")
        argv = _sandbox_argv(Path(tmp).resolve(), script, script.parent, [])
        probe = KeySpec(method="script", script="probe.sh", sha256="0" * 64, timeout=PROBE_TIMEOUT)
        status, _, err, _ = _run_isolated(argv, str(work), probe)
    if status == 0:
        return None
    return f"`{' '.join(UNSHARE)}` and the sandbox's mounts failed (status {status}); {_stderr_tail(err)}"


def _sandboxed(spec: KeySpec, script: Path) -> bool:
    """Whether the key script runs in the sandbox, as spec.sandbox asks; raise when it must and cannot."""
    missing = "decrypt.key.sandbox is off" if spec.sandbox == "off" else sandbox_missing()
    if missing is None:
        return True
    if spec.sandbox == "required":
        raise CryptoError(
            f"decrypt.key.sandbox=required: this machine cannot run key script {script} in a sandbox "
            f"({missing}); it was not run. Allow unprivileged user namespaces (`unshare --user "
            "--map-root-user true` must work), or set decrypt.key.sandbox: best-effort to run it unisolated"
        )
    LOG.warning(
        "NO SANDBOX (%s): key script %s runs unisolated. It can read whatever this user can (HOME, "
        "the repository, this process's environment with its secrets through /proc), reach the "
        "network, write wherever this user can and leave processes running; only its environment "
        "(PATH, HOME, TMPDIR) and its pinned bytes are controlled",
        missing,
        script,
    )
    return False


def _pinned_bytes(script: Path, spec: KeySpec) -> bytes:
    """The script's bytes, read once: the bytes that are hashed are the bytes that run."""
    data = script.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise CryptoError(
            f"key script {script}: its sha256 is {actual} but decrypt.key.sha256 pins {spec.sha256}; "
            "it was not run. Read it: only if you trust it, set decrypt.key.sha256 to its sha256 in "
            "conf/decrypt/ and run `python -m stages.compose`"
        )
    return data


def _run_script(tmp: Path, data: bytes, source: Path, spec: KeySpec, sandboxed: bool) -> Overrun:
    """Run the key script's bytes `data` from the private directory `tmp`; see _run_isolated."""
    script, work = _prepare(tmp, PurePosixPath(spec.script).name, data)
    link = work / spec.layout  # the LMSYS files, laid out as the script expects
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source, target_is_directory=True)
    args = [a.replace("{source}", spec.layout) for a in spec.args]
    argv = _sandbox_argv(tmp, script, source, args) if sandboxed else ["bash", "--", str(script), *args]
    return _run_isolated(argv, str(work), spec)


def _script_key(source: Path, spec: KeySpec, released: Path) -> str:
    script = released / spec.script
    if not script.is_file():
        raise CryptoError(
            f"decrypt.key.script={spec.script!r}: {script} not found (is it in fetch.released.include?)"
        )
    if not source.is_dir():
        raise CryptoError(f"decrypt.key.method=script: the source root {source} is not a directory")
    data = _pinned_bytes(script, spec)
    sandboxed = _sandboxed(spec, script)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keyscript-") as tmp:
        status, out, err, broke = _run_script(Path(tmp).resolve(), data, source.resolve(), spec, sandboxed)
    if broke is not None:
        raise CryptoError(
            f"key script {script} {BROKE[broke].format(spec=spec)} and was killed; {_stderr_tail(err)}"
        )
    if status != 0:
        limits = (
            f"(its limits: decrypt.key.max_memory_mb={spec.max_memory_mb}, max_file_mb={spec.max_file_mb})"
        )
        raise CryptoError(f"key script {script} exited with status {status} {limits}; {_stderr_tail(err)}")
    try:
        passphrase = out.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CryptoError(f"key script {script} printed bytes that are not UTF-8, not a passphrase") from None
    if not passphrase or "\n" in passphrase:
        what = "nothing" if not passphrase else f"{len(passphrase.splitlines())} lines"
        raise CryptoError(
            f"key script {script} exited with status 0 but printed {what} on stdout, not a one-line "
            f"passphrase; {_stderr_tail(err)}"
        )
    where = "in the sandbox" if sandboxed else "UNISOLATED"
    LOG.info("key: ran %s (sha256 %s) %s in %.1f s", script, spec.sha256, where, time.monotonic() - start)
    return passphrase


def _run_gpg(action: str, src: Path, dst: Path, passphrase: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gpghome-") as home, open(src, "rb") as handle:
        os.chmod(home, 0o700)
        gpg = gnupg.GPG(gnupghome=home)
        with atomic_path(dst) as tmp:
            if action == "encrypt":
                result = gpg.encrypt_file(
                    handle,
                    recipients=None,
                    symmetric=CIPHER,
                    passphrase=passphrase,
                    armor=False,
                    output=str(tmp),
                    extra_args=["--compress-algo", "none", "--s2k-digest-algo", "SHA512"],
                )
            else:
                result = gpg.decrypt_file(handle, passphrase=passphrase, output=str(tmp))
            if not result.ok:
                detail = (result.status or "unknown error").strip()
                if "BAD_PASSPHRASE" in (result.stderr or ""):
                    detail += " (wrong passphrase: the key that decrypt.key gives does not open it)"
                raise CryptoError(f"gpg could not {action} {src}: {detail}")


def encrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Encrypt `src` to `dst` with AES-256 under `passphrase` (OpenPGP, binary)."""
    _run_gpg("encrypt", Path(src), Path(dst), passphrase)
    LOG.info("encrypted %s -> %s", src, dst)


def decrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Decrypt `src` to `dst`; on any failure `dst` is not created and CryptoError is raised."""
    _run_gpg("decrypt", Path(src), Path(dst), passphrase)
    LOG.info("decrypted %s -> %s", src, dst)
