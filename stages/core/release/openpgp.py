"""The encrypted instructions of a release as the licence guard checks them: reads a .gpg file's
OpenPGP packet headers (RFC 4880, 4.2), decrypts it with the release's key into the private scratch
directory and compares its records with translate@<subset>'s released rows. Writes nothing that
outlives the check; the decrypted plaintext is removed with its scratch directory.

Encrypted data is one or more session key packets (public-key, tag 1, or symmetric, tag 3) and then
one encrypted data packet (integrity protected, tag 18; legacy, tag 9; AEAD, tag 20) that ends the
file. `gpg --store` (a literal data packet, tag 11) or a compressed packet (tag 8) is not encrypted."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.config.params import Params
from stages.core.rows import fields
from stages.core.storage.atomic import private_tempdir
from stages.core.storage.crypto import CryptoError, decrypt_file, derive_key
from stages.core.storage.jsonl import read_jsonl_gz

SESSION_KEYS = {1: "public-key encrypted session key", 3: "symmetric-key encrypted session key"}
ENCRYPTED = {9: "symmetrically encrypted data", 18: "integrity protected data", 20: "AEAD encrypted data"}
NAMES = {8: "compressed data", 10: "marker", 11: "literal data", 2: "signature", 4: "one-pass signature"}
NAMES |= SESSION_KEYS | ENCRYPTED
HEADERS = 64  # top-level packets read at most: gpg writes two
MISSING = object()  # a record or row past the end of the other side


class PacketError(ValueError):
    """The bytes are not a well-formed sequence of OpenPGP packets."""


def _length(handle: BinaryIO, first: int) -> tuple[int, bool]:
    """A new-format body length from its first octet: (length, whether it is a partial one)."""
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + _octets(handle, 1)[0] + 192, False
    if first == 255:
        return int.from_bytes(_octets(handle, 4), "big"), False
    return 1 << (first & 0x1F), True


def _octets(handle: BinaryIO, count: int) -> bytes:
    data = handle.read(count)
    if len(data) < count:
        raise PacketError("the file ends inside a packet header")
    return data


def _skip(handle: BinaryIO, count: int, size: int) -> None:
    if handle.tell() + count > size:
        raise PacketError("a packet runs past the end of the file")
    handle.seek(count, 1)


def packets(handle: BinaryIO, size: int) -> Iterator[int]:
    """The tag of each top-level packet of an OpenPGP message of `size` bytes, its body skipped."""
    while handle.tell() < size:
        header = _octets(handle, 1)[0]
        if not header & 0x80:
            raise PacketError(f"byte {handle.tell() - 1} is no packet header (its high bit is clear)")
        if header & 0x40:  # new format: the tag in 6 bits, lengths that may be partial
            tag, partial = header & 0x3F, True
            while partial:
                length, partial = _length(handle, _octets(handle, 1)[0])
                _skip(handle, length, size)
        else:  # old format: the tag in 4 bits, a 1-, 2- or 4-octet length or "to the end of the file"
            tag, kind = (header >> 2) & 0x0F, header & 0x03
            length = size - handle.tell() if kind == 3 else int.from_bytes(_octets(handle, 1 << kind), "big")
            _skip(handle, length, size)
        yield tag


def _named(tag: int) -> str:
    return f"{NAMES.get(tag, 'packet')} (tag {tag})"


def packet_refusal(path: Path) -> str | None:
    """Why `path` is not OpenPGP encrypted data, or None when it is (see the module's docstring)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        try:
            tags = list(itertools.islice(packets(handle, size), HEADERS + 1))
        except PacketError as err:
            return f"not OpenPGP data: {err}"
    if not tags:
        return "empty: not OpenPGP encrypted data"
    if tags[0] not in SESSION_KEYS:
        return (
            f"not encrypted: its first OpenPGP packet is {_named(tags[0])}, not a session key packet "
            "(`gpg --store` writes a literal or compressed packet that anyone can read)"
        )
    body = list(itertools.dropwhile(lambda tag: tag in SESSION_KEYS, tags))
    if not body or body[0] not in ENCRYPTED:
        after = _named(body[0]) if body else "nothing"
        return f"not encrypted: its session key packets are followed by {after}, not encrypted data"
    if len(body) > 1:
        return f"holds {_named(body[1])} after its encrypted data: gpg writes nothing there"
    return None


def _expected(path: Path) -> Iterator[tuple[str, str | None]]:
    """(conversation_id, instruction_ja) of each row of translate's out `path` that a release holds."""
    columns = ["conversation_id", "instruction_ja", "translation_failed"]
    with pq.ParquetFile(path) as table:
        for batch in table.iter_batches(batch_size=8192, columns=columns):
            released = batch.filter(pc.invert(batch.column("translation_failed")))
            yield from zip(*(released.column(c).to_pylist() for c in columns[:2]), strict=True)


def _record_refusal(i: int, record: object, expected: object, subset: str) -> str:
    """Why decrypted record `i` is not the released row `expected`, or '' when it is."""
    if expected is MISSING:
        return f"its plaintext holds record {i} beyond the {i} rows translate@{subset} releases"
    if record is MISSING:
        return f"its plaintext ends at record {i}, before translate@{subset}'s released rows do"
    if not isinstance(record, dict) or set(record) != {"conversation_id", fields.INSTRUCTION}:
        return f"its record {i} holds other fields than conversation_id and {fields.INSTRUCTION}"
    if record["conversation_id"] != expected[0]:  # not quoted: it may be any text
        return f"its record {i} is not conversation {expected[0]}, translate@{subset}'s released row {i}"
    if record[fields.INSTRUCTION] != [{"role": "user", "content": expected[1]}]:
        return f"its record {i} (conversation {expected[0]}) is not that conversation's instruction alone"
    return ""


def decrypted_refusal(params: Params, name: str, path: Path) -> str | None:
    """Why the encrypted instructions `path` of variant `name` do not decrypt, with the release's key
    (derived as package does), to exactly translate@<subset>'s released rows, in order; None when
    they do. SourceError when translate's out is not here to compare with."""
    paths, subset = params.paths, params.models[name].subset
    translated = Path(paths.translated_of(subset))
    if not translated.is_file():
        raise SourceError(
            f"{translated} does not exist: run `dvc pull translate@{subset}` to check the release"
        )
    try:
        key = derive_key(paths.source, params.decrypt.key, released_root=paths.released)
    except CryptoError as err:
        return f"cannot be checked: the release's key is not at hand ({err})"
    with private_tempdir(Path(paths.instructions).parent, f"guard-{name}") as scratch:
        plain = scratch / "instructions.jsonl.gz"
        try:
            decrypt_file(path, plain, key)
        except CryptoError as err:
            return f"does not decrypt with the release's key (decrypt.key): {err}"
        pairs = itertools.zip_longest(read_jsonl_gz(plain), _expected(translated), fillvalue=MISSING)
        try:
            for i, (record, expected) in enumerate(pairs):
                if why := _record_refusal(i, record, expected, subset):
                    return why
        except (SourceError, OSError, EOFError, UnicodeDecodeError) as err:
            return f"its plaintext is not gzip JSON lines as package writes them ({err})"
    return None
