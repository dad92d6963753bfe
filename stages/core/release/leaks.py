"""The content check of the licence guard: reads translate@<subset>'s Japanese instructions (the
release's plaintext) and the public files of a release directory, and says where any string of them
(every column, nested structs and lists, field names, metadata, JSON keys, raw bytes) holds a private
instruction or a long part of one. Writes nothing; package@<variant> runs it before its release is
put in place and `python -m stages.publish` before any request (docs/security.md).

In the text the models wrote (GENERATED), which may quote its instruction (code to fix, a text to
proofread), only a value more than half of whose windows are instruction text is refused (a copy, not
a quote); everywhere else any match is. Text is compared normalised: NFKC, casefolded, without
whitespace or format characters. Each instruction gives the hashes of its 32-character windows at
every 16th character and its last one, so a copied run of 47 normalised characters or more, or a
whole instruction of 32 or more, is found inside any string; an instruction of 8 to 31 characters
only as a whole value. Cost, measured on random Japanese text (2 shared cores, one used): the index
holds 10 bytes per 16 characters of instructions (20,000 of ~310 characters: 0.7 s; ~120 MB expected
for 450k of ~300); a file is read 1024 rows and at most 512k characters at a time, at ~10 M
characters a second, Parquet and jsonl.gz alike (138 M in 13 s), in ~140 MB beside the index
whatever its size (Parquet files of 70 and 283 MB: 358 and 378 MB resident in all)."""

from __future__ import annotations

import functools
import logging
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params
from stages.core.release.strings import BATCH_ROWS, RAW, raw_strings, strings

WINDOW = 32  # characters hashed together: a common phrase is shorter (tests/test_leaks.py)
STRIDE = 16  # an instruction's windows kept: a copied run of WINDOW + STRIDE - 1 is always found
MIN_WHOLE = 8  # a shorter instruction ("こんにちは", "続けて") is a common phrase, not checked
PIECE = 1 << 18  # characters hashed at once (~80 bytes each while hashed); a longer text is sliced
OVERLAP = 4096  # characters of a slice of a long text read again with the next
BASE = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
BASE_INVERSE = pow(BASE, -1, 1 << 64)
U64 = np.uint64
LOG = logging.getLogger(__name__)
# text the models wrote, which may quote its instruction (code to fix, a text to proofread, "repeat
# this"): refused only where most of it is instruction text, a copy rather than a quote
GENERATED = {
    "synthesized_assistant_responses[].content",
    "synthesized_assistant_responses_en[].content",
    "synthesized_response_scoring_annotations[].judgement",
    "synthesized_multiturn_conversation[][].content",
}
GENERATED_SHARE = 0.5  # of a generated text's 32-character windows that may be instruction text
ECHO_SHARE = 0.05  # of a file's answers that may echo their instruction (a copying transformation: most)


class LeakError(PipelineError):
    """A release file holds a private instruction: package does not write the release."""


@functools.cache
def _dropped() -> np.ndarray:
    """Whether each code point is dropped before hashing: whitespace and format characters (zero-width
    spaces and joiners, soft hyphens, bidirectional marks)."""
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    table[
        [c for c in range(sys.maxunicode + 1) if chr(c).isspace() or unicodedata.category(chr(c)) == "Cf"]
    ] = True
    return table


def normalised(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points of `texts` as compared, joined (NFKC, casefolded, no whitespace or format
    characters), and the length of each."""
    folded = [unicodedata.normalize("NFKC", text).casefold() for text in texts]
    codes = np.frombuffer("".join(folded).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    lengths = np.fromiter(map(len, folded), dtype=np.int64, count=len(folded))
    keep = ~_dropped()[codes]
    if not keep.all():
        owner = np.repeat(np.arange(len(folded)), lengths)
        codes, lengths = codes[keep], np.bincount(owner[keep], minlength=len(folded))
    return codes.astype(U64), lengths


def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE_INVERSE**i modulo 2**64 for i < size: views of the ones of 2 * PIECE + 1
    characters, made once, or made for this size (a text that NFKC made longer)."""
    made = _powers_of(2 * PIECE + 1) if size <= 2 * PIECE + 1 else _powers_of.__wrapped__(size)
    return made[0][:size], made[1][:size]


@functools.cache
def _powers_of(size: int) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for base in (BASE, BASE_INVERSE):
        powers = np.full(size, base, dtype=U64)
        powers[0] = 1
        out.append(np.cumprod(powers, dtype=U64))  # wraps modulo 2**64
    return out[0], out[1]


@dataclass(frozen=True)
class Hashes:
    """The hashes of a batch of normalised texts: every WINDOW-character window inside one text, with
    the index of its text and its offset there, and each text of MIN_WHOLE to WINDOW - 1 characters
    whole, with its index. A polynomial hash modulo 2**64 from prefix sums, mixed."""

    windows: np.ndarray
    owner: np.ndarray
    offset: np.ndarray
    short: np.ndarray
    short_owner: np.ndarray

    @classmethod
    def of(cls, codes: np.ndarray, lengths: np.ndarray) -> Hashes:
        powers, inverse = _powers(len(codes) + 1)
        prefix = np.zeros(len(codes) + 1, dtype=U64)
        np.cumsum(codes * powers[: len(codes)], out=prefix[1:])
        ends = np.cumsum(lengths)
        starts = ends - lengths
        short = np.flatnonzero((lengths >= MIN_WHOLE) & (lengths < WINDOW))
        whole = (prefix[ends[short]] - prefix[starts[short]]) * inverse[starts[short]]
        whole += lengths[short].astype(U64) * U64(BASE)  # and its length
        count = np.maximum(lengths - WINDOW + 1, 0)
        owner = np.repeat(np.arange(len(lengths)), count)
        offset = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
        first = starts[owner] + offset
        hashes = (prefix[first + WINDOW] - prefix[first]) * inverse[first]
        return cls(_mix(hashes), owner, offset, _mix(whole), short)


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every bit of the window reaches the top bits."""
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> U64(33))


def _member(values: np.ndarray, sorted_: np.ndarray) -> np.ndarray:
    if not len(sorted_) or not len(values):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_, values), len(sorted_) - 1)
    return sorted_[at] == values


@dataclass
class PrivateText:
    """The private instructions as hashes: the sorted window hashes with a Bloom filter of them (16
    bits and two probes per window: ~1.4% of a public text's windows reach the binary search), and
    the sorted hashes of the short ones whole."""

    index: np.ndarray
    short: np.ndarray
    bloom: np.ndarray
    instructions: int

    @classmethod
    def of(cls, batches: Iterable[list[str]]) -> PrivateText:
        """The index of the instructions in `batches` (lists of texts)."""
        parts, short, count = [np.empty(0, U64)], [np.empty(0, U64)], 0
        for texts in batches:
            for group, _ in _pieces(texts):  # a long instruction's slices are indexed as instructions
                codes, lengths = normalised(group)
                count += int(np.count_nonzero(lengths >= MIN_WHOLE))
                hashes = Hashes.of(codes, lengths)
                last = hashes.offset == lengths[hashes.owner] - WINDOW
                parts.append(hashes.windows[(hashes.offset % STRIDE == 0) | last])
                short.append(hashes.short)
        index = np.unique(np.concatenate(parts))
        bloom = np.zeros(1 << (max(len(index).bit_length() + 4, 16) - 3), dtype=np.uint8)
        for bit in _probes(index, len(bloom) * 8):
            np.bitwise_or.at(bloom, bit >> U64(3), (U64(1) << (bit & U64(7))).astype(np.uint8))
        return cls(index, np.unique(np.concatenate(short)), bloom, count)

    def held(self, hashes: np.ndarray) -> np.ndarray:
        """Whether each window hash is one of the index: the Bloom filter first, then a binary search."""
        maybe = np.ones(len(hashes), dtype=bool)
        for bit in _probes(hashes, len(self.bloom) * 8):
            maybe &= ((self.bloom[bit >> U64(3)] >> (bit & U64(7)).astype(np.uint8)) & 1).astype(bool)
        held = np.zeros(len(hashes), dtype=bool)
        held[maybe] = _member(hashes[maybe], self.index)
        return held

    def hits(self, texts: list[str], share: float = 0.0) -> set[int]:
        """The indices of `texts` that hold a private instruction or a part of one; with `share`, only
        those of which more than that share of windows is instruction text (a copy, not a quote)."""
        found = set()
        for group, owners in _pieces(texts):
            hashes = Hashes.of(*normalised(group))
            held = self.held(hashes.windows)
            counts = np.bincount(hashes.owner[held], minlength=len(group))
            totals = np.maximum(np.bincount(hashes.owner, minlength=len(group)), 1)
            whole = np.zeros(len(group), dtype=bool)
            whole[hashes.short_owner[_member(hashes.short, self.short)]] = True
            # the index keeps every STRIDE-th window of an instruction: a text that is all instruction text
            # has about 1 / STRIDE of its windows held
            hit = np.flatnonzero(whole | ((counts > 0) & (counts * STRIDE / totals > share)))
            found.update(owners[i] for i in hit.tolist())
        return found


def _probes(hashes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The two Bloom filter bits of each hash: from its top and its bottom bits."""
    width = U64(bits.bit_length() - 1)
    return hashes >> (U64(64) - width), hashes & U64(bits - 1)


def _pieces(texts: list[str]) -> Iterator[tuple[list[str], list[int]]]:
    """`texts` in groups of up to 2 * PIECE characters, with the index of each text; a text longer
    than PIECE in slices that overlap by OVERLAP characters (a window is cut only where
    whitespace spreads it wider)."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    if lengths.sum() <= PIECE:
        yield texts, range(len(texts))
        return
    small = np.flatnonzero(lengths <= PIECE)
    group = np.cumsum(lengths[small]) // PIECE
    for cut in np.split(small, np.flatnonzero(np.diff(group)) + 1):
        yield [texts[i] for i in cut.tolist()], cut.tolist()
    for i in np.flatnonzero(lengths > PIECE).tolist():
        for start in range(0, len(texts[i]) - OVERLAP, PIECE - OVERLAP):
            yield [texts[i][start : start + PIECE]], [i]


def private_text(params: Params, name: str) -> PrivateText:
    """The instructions of variant `name`'s subset as translate@<subset> wrote them (instruction_ja,
    every row), read a batch at a time; SourceError with the fix when its out is not here."""
    subset = params.models[name].subset
    path = Path(params.paths.translated_of(subset))
    if not path.is_file():
        raise SourceError(
            f"{path} does not exist: the licence guard compares the release with its plaintext "
            f"instructions; run `dvc pull translate@{subset}` (private remote) or "
            f"`dvc repro translate@{subset}`"
        )
    with pq.ParquetFile(path) as table:
        batches = table.iter_batches(batch_size=8 * BATCH_ROWS, columns=["instruction_ja"])
        return PrivateText.of([t for t in batch.column(0).to_pylist() if t] for batch in batches)


@dataclass(frozen=True)
class Scan:
    """What the content check found in a file: the column paths it holds (Parquet, JSON) and where it
    holds private instruction text, or why it could not be read (None: neither)."""

    paths: set[str]
    leaks: str | None


def scan(path: Path, private: PrivateText) -> Scan:
    """Read file `path` for private instruction text: a Parquet, jsonl.gz or JSON file value by value,
    any file as raw bytes too (reported when no value is). Each column path is named with its first
    row; no text of the file is quoted."""
    found: dict[str, list[int]] = {}
    paths: set[str] = set()
    answered: dict[str, set[int]] = {}  # the rows holding text the models wrote, by path
    try:
        for texts, where, rows in strings(path, paths):
            kept = [i for i, t in enumerate(texts) if t]
            share = GENERATED_SHARE if where in GENERATED else 0.0
            if where in GENERATED:
                answered.setdefault(where, set()).update(int(rows[i]) for i in kept)
            for i in private.hits([texts[i] for i in kept], share):
                found.setdefault(where, []).append(int(rows[kept[i]]))
        found = _without_echoes(path, found, answered)
        if path.name.endswith(".parquet"):  # its compressed pages cut text anywhere: no raw read, but
            if slack := _unread_bytes(path):  # no byte that no reader reads
                return Scan(paths, f"holds {slack} bytes that no Parquet reader reads (outside its pages)")
        else:
            for texts, where, rows in [] if found else raw_strings(path):  # a run of bytes as a value
                hits = private.hits(texts, GENERATED_SHARE)  # the models wrote: a quote passes
                found.setdefault(where, []).extend(int(rows[i]) for i in hits)
    except (pa.ArrowException, OSError, EOFError, ValueError) as err:  # ValueError: JSON, UTF-8
        return Scan(paths, f"cannot be read value by value for the content check ({err})")
    found = {where: rows for where, rows in found.items() if rows}
    places = []
    for where, rows in found.items():
        first, count = min(rows), len(set(rows))
        at = "" if first < 0 else f", {'byte' if where == RAW else 'row'} {first}"
        places.append(f"{where}{at}{f' ({count} rows)' if count > 1 and where != RAW else ''}")
    if not places:
        return Scan(paths, None)
    return Scan(paths, "holds private instruction text (LMSYS-Chat-1M licence) in " + "; ".join(places))


def _without_echoes(path: Path, found: dict[str, list[int]], answered: dict[str, set[int]]) -> dict:
    """`found` without the few answers that echo their instruction: a model may answer "repeat this" by
    repeating it, and the published responses hold such answers; a transformation that copies the
    instructions into an answer column does so in most rows. A path of the text the models wrote is
    refused only where more than ECHO_SHARE of its rows hold instruction text; the others are logged."""
    kept = {}
    for where, rows in found.items():
        total = len(answered.get(where, ()))
        if where in GENERATED and total and len(set(rows)) <= ECHO_SHARE * total:
            LOG.warning(
                "%s: %d of %d rows of %s echo instruction text (model output, published as the published "
                "responses are; refused above %.0f%%)",
                path.name,
                len(set(rows)),
                total,
                where,
                100 * ECHO_SHARE,
            )
            continue
        kept[where] = rows
    return kept


def _unread_bytes(path: Path) -> int:
    """Bytes of a Parquet file outside its magic numbers, column chunks and footer (a reader skips
    them, so text could hide there): its chunks must tile the file from byte 4 to the footer."""
    with pq.ParquetFile(path) as file:
        meta = file.metadata
        chunks = sorted(
            (
                min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o is not None and o > 0),
                col.total_compressed_size,
            )
            for r in range(meta.num_row_groups)
            for col in (meta.row_group(r).column(c) for c in range(meta.row_group(r).num_columns))
        )
        footer = meta.serialized_size + 8
    end, unread = 4, 0
    for start, size in chunks:
        unread += abs(start - end)
        end = start + size
    return unread + abs(path.stat().st_size - footer - end)


def check_directory(params: Params, name: str, directory: Path) -> None:
    """LeakError naming each public file of `directory` (package@<name>'s staged release) that holds
    private instruction text, before the release is put in place."""
    private = private_text(params, name)
    refused = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.endswith(".gpg") and (why := scan(path, private).leaks):
            refused[path.name] = why
    if refused:
        lines = "\n".join(f"  {file}: {why}" for file, why in refused.items())
        raise LeakError(
            f"package@{name}: not writing the release (the previous one, if any, is kept):\n{lines}\n"
            "A public column received an instruction's text: find the row transformation that copies it"
        )
