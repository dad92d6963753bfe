"""The params of the inputs: fetch's sources and filter, decrypt's subsets and key."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from stages.core.config.paths import Location
from stages.core.config.schema import RUNTIME, SHA256, Pins, Strict


class SourceSpec(Strict):
    uri: Location  # a path inside the repository, or a URL: s3://, hf://datasets/<repo>, file:///...
    revision: str | None = None  # Hub revision: a 40-hex commit in release configs
    include: list[str] = Field(min_length=1)  # globs relative to uri
    sha256: Pins = {}  # expected checksums by relative path
    # fsspec options that are not secrets, e.g. {endpoint_url: ...} for S3, {endpoint: ...} for a Hub mirror
    storage_options: dict[str, str | int | float | bool] = {}


class FilterSpec(Strict):
    """fetch's rules. Moderation-flagged conversations are always kept, with their `flagged` flag:
    translate@ja leaves them out, translate@ja+unsafe keeps them (one fetch serves both subsets)."""

    languages: list[str] = Field(min_length=1)
    redacted: Literal["drop", "keep"]
    # first user turns longer than this many characters are kept and flagged long_first_turn
    long_first_turn_chars: int = Field(ge=1)


class FetchParams(Strict):
    source: SourceSpec
    released: SourceSpec
    filter: FilterSpec


class KeySpec(Strict):
    """How the passphrase of the released .gpg files is obtained (see conf/decrypt/lmsys.yaml).

    method hash: a digest over the files that `file` matches under the source root, in sorted path
    order: over their bytes, or, when `column` is set, over that Parquet column's values in row
    order, each as UTF-8 text followed by a newline (independent of how the Parquet file is encoded).

    method script: the released repository's key script (`script`, a path under the released root,
    fetched with it) runs only when its bytes hash to `sha256`, under bash in an empty temporary
    working directory where the source root appears as the directory `layout`, with `args` ({source}
    becomes `layout`), an environment of PATH, HOME and TMPDIR (HOME and TMPDIR: that directory) and
    `timeout` seconds; its stdout, trimmed, is the passphrase. `sandbox` says whether it must run
    isolated (stages/core/storage/crypto.py: no network, no other process, no HOME, writes only to its
    directory, nothing left running).
    """

    method: Literal["hash", "script"] = "hash"
    file: str | None = None  # hash: glob relative to the source root
    column: str | None = None  # hash: hash this column's values instead of the file bytes
    hash: Literal["sha256", "sha512", "md5", "sha1"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    script: str | None = None  # script: path relative to the released root (list it in fetch.released)
    layout: str = "lmsys-chat-1m"  # script: the source root's name in the script's working directory
    args: list[str] = []  # script: its arguments; {source} is replaced by `layout`
    timeout: float = Field(600.0, gt=0, json_schema_extra=RUNTIME)  # script: seconds before it is killed
    # script: its limits, each killing it (or failing its allocation) when broken: memory (address
    # space), processes at once, bytes on stdout (a passphrase is one short line), size of a file written
    max_memory_mb: int = Field(1024, ge=16, json_schema_extra=RUNTIME)
    max_processes: int = Field(32, ge=1, json_schema_extra=RUNTIME)
    max_output_bytes: int = Field(4096, ge=1, json_schema_extra=RUNTIME)
    max_file_mb: int = Field(64, ge=1, json_schema_extra=RUNTIME)
    # script: the hex sha256 of the bytes it may run, checked on the bytes that run (required)
    sha256: str | None = Field(None, pattern=f"^{SHA256}$")
    # script: required (refuse to run it where this machine has no sandbox), best-effort (then run it
    # unisolated, with a warning) or off (never isolate it)
    sandbox: Literal["required", "best-effort", "off"] = Field("required", json_schema_extra=RUNTIME)

    @field_validator("script", "layout")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        path = PurePosixPath(value or ".")
        if value is not None and (path.is_absolute() or not path.parts or ".." in path.parts):
            raise ValueError(f"{value!r} must be a relative path without '..'")
        return value

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> KeySpec:
        if self.method == "hash" and self.file is None:
            raise ValueError("method hash needs `file` (a glob under the source root)")
        if self.method == "script":
            if self.script is None:
                raise ValueError("method script needs `script` (its path under the released root)")
            if self.sha256 is None:
                raise ValueError(
                    "method script needs `sha256`, the hex sha256 of the script it may run: read the "
                    "fetched script, then pin the sha256 that data/raw/manifest.json lists for it"
                )
            ignored = [key for key in ("file", "column") if getattr(self, key) is not None]
            if ignored:
                raise ValueError(f"method script does not use {ignored}: set them to null or use method hash")
        return self


Subset = Literal["ja", "ja+unsafe"]  # ja: moderation-clean conversations; ja+unsafe: all of them


class DecryptParams(Strict):
    # the released subsets that decrypt@S and translate@S run for: exactly those the variants use
    subsets: list[Subset] = Field(min_length=1)
    file: str  # released file name, {subset} is replaced
    key: KeySpec
