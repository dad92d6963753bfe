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
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath

import gnupg
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.config.errors import PipelineError
from stages.core.config.params import KeySpec, load_params
from stages.core.storage.io import CHUNK, atomic_path

LOG = logging.getLogger(__name__)
CIPHER = "AES256"
STDERR_LINES = 5  # lines of a failed key script's stderr quoted in the error (never its stdout)
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


def _run_isolated(argv: list[str], cwd: str, timeout: float) -> tuple[int | None, bytes, bytes]:
    """Run argv in `cwd`, in a session of its own, with PATH, HOME and TMPDIR (both `cwd`) as its only
    variables; return (exit status, stdout, stderr), the status None when it ran past `timeout` and
    its whole process group was killed."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": cwd, "TMPDIR": cwd}
    pipe = subprocess.PIPE
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the script and whatever it started
            out, err = b"", b""
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, err = proc.communicate(timeout=KILL_GRACE)
            return None, out, err
    return proc.returncode, out, err


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
        status, _, err = _run_isolated(argv, str(work), PROBE_TIMEOUT)
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


def _run_script(
    tmp: Path, data: bytes, source: Path, spec: KeySpec, sandboxed: bool
) -> tuple[int | None, bytes, bytes]:
    """Run the key script's bytes `data` from the private directory `tmp`; see _run_isolated."""
    script, work = _prepare(tmp, PurePosixPath(spec.script).name, data)
    link = work / spec.layout  # the LMSYS files, laid out as the script expects
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source, target_is_directory=True)
    args = [a.replace("{source}", spec.layout) for a in spec.args]
    argv = _sandbox_argv(tmp, script, source, args) if sandboxed else ["bash", "--", str(script), *args]
    return _run_isolated(argv, str(work), spec.timeout)


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
        status, out, err = _run_script(Path(tmp).resolve(), data, source.resolve(), spec, sandboxed)
    if status is None:
        raise CryptoError(
            f"key script {script} ran past decrypt.key.timeout={spec.timeout:g} s and was killed; "
            f"{_stderr_tail(err)}"
        )
    if status != 0:
        raise CryptoError(f"key script {script} exited with status {status}; {_stderr_tail(err)}")
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
