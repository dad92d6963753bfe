"""Row logic of translate: empty, duplicate-of, template and failed-translation flags, a batch of
rows at a time (vectorised where the rule allows it; Python only for the template regexes, and
only over the rows whose text holds a rule's literal run: see Template.prefilters)."""

from __future__ import annotations

import functools
import itertools
import re
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config.errors import PipelineError
from stages.core.config.translate_params import TemplateRule
from stages.core.rows import fields

FLAGS = pa.schema(
    [
        (fields.EMPTY, pa.bool_()),  # empty or blank; a failed translation is not empty
        (fields.DUPLICATE, pa.string()),  # conversation_id of the first identical one
        (fields.TEMPLATE, pa.string()),  # template category of the original instruction
        ("translation_failed", pa.bool_()),  # no Japanese instruction: the translator failed
    ]
)


@functools.cache
def _blank_pattern() -> str:
    """An RE2 pattern matching exactly the texts that Python's str.strip() leaves empty."""
    spaces = filter(str.isspace, _code_points())  # a surrogate is no space
    return "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]*$"


def blank(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """An empty instruction is an empty (or blank) text; a failed translation (null) is not empty."""
    return pc.match_substring_regex(texts, _blank_pattern()).fill_null(False)


def first_occurrences(table: pa.Table) -> pa.ChunkedArray:
    """For each row of `table` (row, conversation_id, instruction_ja): the conversation_id of the
    row with the smallest `row` holding the identical text, or null for that row itself (and for a
    null text). Every row with a given text must be in `table` (a spill part holds them all)."""
    n = table.num_rows
    order = pc.sort_indices(table, sort_keys=[("instruction_ja", "ascending"), ("row", "ascending")])
    texts = table["instruction_ja"].take(order)
    new = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.equal(texts.slice(1), texts.slice(0, n - 1)).fill_null(False)
        new[1:] = ~same.to_numpy(zero_copy_only=False)
    first = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    duplicates = table["conversation_id"].take(order).take(pa.array(first, mask=new))
    inverse = np.empty(n, dtype=np.int64)
    inverse[order.to_numpy()] = np.arange(n)
    return duplicates.take(pa.array(inverse))


@functools.cache
def _code_points() -> str:
    """Every character a Python string can hold but the surrogates, in one string."""
    points = np.concatenate([np.arange(0xD800), np.arange(0xE000, sys.maxunicode + 1)])
    return points.astype("<u4").tobytes().decode("utf-32-le")


def _same_characters(chars: set[str], flags: int) -> dict[str, str]:
    """An RE2 class for each of `chars`: every character that it, a literal in a Python regex with
    `flags`, matches (under (?i): i, I, İ and ı for i), as Python's regex engine itself finds."""
    flags &= ~(re.DEBUG | re.VERBOSE)
    either = re.compile("|".join(map(re.escape, sorted(chars))), flags)
    matched = sorted({m.group() for m in either.finditer(_code_points())})
    classes = {}
    for char in chars:
        found = [c for c in matched if re.fullmatch(re.escape(char), c, flags)]
        escaped = "".join(f"\\x{{{ord(c):x}}}" for c in found)
        classes[char] = escaped if len(found) == 1 else f"[{escaped}]"
    return classes


QUANTIFIER = re.compile(r"\*|\+|\?|\{(\d*)(?:,\d*)?\}")  # a repeat, its minimum in {m,n}
ESCAPES = frozenset("0123456789ABDNSUWZabdfnrstuvwx")  # escapes that are not the character itself
# what follows an escape that is part of it: \x41, \u3042, \U0001F600, \N{...}, \012, \12
ESCAPE_TAIL = re.compile(
    r"(?<=x)[0-9a-fA-F]{2}|(?<=u)[0-9a-fA-F]{4}|(?<=U)[0-9a-fA-F]{8}|(?<=N)\{[^}]*\}|(?<=\d)\d{0,2}"
)


def _skip_group(text: str, start: int) -> int:
    """The index after the group or class that opens at `start` (nested groups, classes and escapes
    inside it skipped); len(text) when it never closes (re.compile has refused that pattern)."""
    depth, i, in_class, class_start = 0, start, False, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]" and i > class_start:
                in_class = False
                if depth == 0:
                    return i + 1
        elif c == "[":
            in_class, class_start = True, i + 1 + (text[i + 1 : i + 2] == "^")
            if text[class_start : class_start + 1] == "]":
                class_start += 1  # "[]...]": the first ] is a member
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _literal_run(pattern: re.Pattern) -> str:
    """The longest run of characters that every match of `pattern` holds in this order, read off its
    top level: literal characters, with groups, classes, escapes that stand for a set, anchors and
    optional repeats breaking a run ("" under an alternation or re.VERBOSE). Conservative: a run
    it cannot be sure of is cut, never guessed (tests/test_annotate.py checks it against `re`)."""
    text = pattern.pattern if isinstance(pattern.pattern, str) else ""
    if pattern.flags & re.VERBOSE:
        return ""
    runs, run, i, literal = [], "", 0, False  # literal: the last atom was run's last character
    while i < len(text):
        c = text[i]
        if repeat := QUANTIFIER.match(text, i):
            i = repeat.end() + (text[repeat.end() : repeat.end() + 1] in ("?", "+"))  # lazy, possessive
            if literal and (c in "*?" or (c == "{" and not int(repeat.group(1) or 0))):
                run = run[:-1]  # an optional character is not in every match
            runs.append(run)
            run, literal = "", False
            continue
        if c == "|":
            return ""  # an alternation at the top level: no run is in every match
        if c == "\\" and i + 1 < len(text) and text[i + 1] not in ESCAPES:
            run, i, literal = run + text[i + 1], i + 2, True
            continue
        if c in "\\.^$()[":
            if c == "\\":  # an escape that stands for a set, a position or a coded character
                i = (
                    (tail.end() if (tail := ESCAPE_TAIL.match(text, i + 2)) else i + 2)
                    if i + 1 < len(text)
                    else i + 1
                )
            else:
                i = _skip_group(text, i) if c in "([" else i + 1
            runs.append(run)
            run, literal = "", False
            continue
        run, i, literal = run + c, i + 1, True
    return max([*runs, run], key=len)


def prefilters(patterns: list[re.Pattern]) -> list[str | None]:
    """For each pattern, an RE2 regex that every text it finds a match in matches too (None where
    there is none): its literal run (_literal_run), each character a class of those it stands for."""
    runs = [_literal_run(p) for p in patterns]
    classes = {}
    for flags in {p.flags for p in patterns}:
        chars = {c for p, run in zip(patterns, runs, strict=True) if p.flags == flags for c in run}
        if chars:
            classes.update(((c, flags), cls) for c, cls in _same_characters(chars, flags).items())
    return ["".join(classes[c, p.flags] for c in run) or None for p, run in zip(patterns, runs, strict=True)]


@dataclass(frozen=True)
class Template:
    """A compiled translate.templates rule: its category, the column it reads, its regexes and
    their prefilters (an RE2 regex each, matched by Arrow over a whole column: a text that none
    of them matches is one that no pattern of the rule matches; None: any text may be)."""

    category: str
    field: str
    patterns: tuple[re.Pattern, ...]
    prefilters: tuple[str | None, ...]

    def matches(self, text: str | None) -> bool:
        return bool(text) and any(p.search(text) for p in self.patterns)


def compile_templates(rules: list[TemplateRule]) -> list[Template]:
    """Compile the rules in order; a bad regex names its rule, category and pattern."""
    compiled = []
    for index, rule in enumerate(rules):
        patterns = []
        for pattern in rule.patterns:
            try:
                patterns.append(re.compile(pattern))
            except re.error as err:
                raise PipelineError(
                    f"translate.templates[{index}] ({rule.category!r}): bad regex {pattern!r}: {err}"
                ) from err
        compiled.append(patterns)
    found = iter(prefilters([p for patterns in compiled for p in patterns]))
    return [
        Template(rule.category, rule.field, tuple(patterns), tuple(itertools.islice(found, len(patterns))))
        for rule, patterns in zip(rules, compiled, strict=True)
    ]


def template_category(row: dict, templates: list[Template]) -> str | None:
    """The category of the first rule that matches `row` (instruction, instruction_ja), else None."""
    return next((t.category for t in templates if t.matches(row.get(t.field))), None)


def _candidates(table: pa.Table, templates: list[Template]) -> np.ndarray:
    """The rows of `table` that some rule may match: those whose text (in the column the rule
    reads) one of the rule's prefilters matches; every row where a pattern has none."""
    may = np.zeros(table.num_rows, dtype=bool)
    for field in dict.fromkeys(t.field for t in templates):
        filters = [f for t in templates if t.field == field for f in t.prefilters]
        if None in filters:
            return np.arange(table.num_rows)
        either = "|".join(f"(?:{f})" for f in filters)
        may |= pc.match_substring_regex(table[field], either).fill_null(False).to_numpy(zero_copy_only=False)
    return np.flatnonzero(may)


def template_categories(table: pa.Table, templates: list[Template]) -> pa.Array:
    """template_category of each row of a batch: one pass of each rule's prefilters over its column
    (Arrow), then of each regex over the rows they leave (Python)."""
    rows = _candidates(table, templates)
    found = table.take(pa.array(rows, pa.int64()))
    categories: list[str | None] = [None] * found.num_rows
    columns = {t.field: found[t.field].fill_null("").to_pylist() for t in templates}
    for template in reversed(templates):  # an earlier rule overwrites a later one
        values = columns[template.field]
        for pattern in template.patterns:
            for i in itertools.compress(range(len(values)), map(pattern.search, values)):
                categories[i] = template.category if values[i] else None
    where = np.full(table.num_rows, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    return pa.array(categories, pa.string()).take(pa.array(where, mask=where < 0))


def with_flags(
    table: pa.Table, duplicates: pa.Array | pa.ChunkedArray, templates: list[Template]
) -> pa.Table:
    """Append the published flags to a batch of rows: over `instruction_ja`, the template rules over
    the column each names, `duplicate_user_instruction_ja` from `duplicates` (the first earlier
    row with the identical text, see first_occurrences) unless the text is empty."""
    texts = table["instruction_ja"]
    empty = blank(texts)
    flags = [
        empty,
        pc.if_else(empty, pa.scalar(None, pa.string()), duplicates),
        template_categories(table, templates),
        pc.is_null(texts),
    ]
    for field, column in zip(FLAGS, flags, strict=True):
        table = table.append_column(field, column)
    return table
