"""Row logic of translate: empty, duplicate-of, template and failed-translation flags, a batch of
rows at a time (vectorised where the rule allows it; Python only for the template regexes)."""

from __future__ import annotations

import functools
import itertools
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.errors import PipelineError

FLAGS = pa.schema(
    [
        ("empty_user_instruction_ja", pa.bool_()),  # empty or blank; a failed translation is not empty
        ("duplicate_user_instruction_ja", pa.string()),  # conversation_id of the first identical one
        ("is_template_instruction", pa.string()),  # template category of the original instruction
        ("translation_failed", pa.bool_()),  # no Japanese instruction: the translator failed
    ]
)


@functools.cache
def _blank_pattern() -> str:
    """An RE2 pattern matching exactly the texts that Python's str.strip() leaves empty."""
    spaces = filter(str.isspace, map(chr, range(sys.maxunicode + 1)))
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


def compile_templates(templates: dict[str, str]) -> list[tuple[str, re.Pattern]]:
    compiled = []
    for category, pattern in templates.items():
        try:
            compiled.append((category, re.compile(pattern)))
        except re.error as err:
            raise PipelineError(f"translate.templates[{category!r}]: bad regex {pattern!r}: {err}") from err
    return compiled


def template_category(text: str | None, templates: list[tuple[str, re.Pattern]]) -> str | None:
    """The first template category whose regex matches the original instruction, else None."""
    for category, pattern in templates:
        if text and pattern.search(text):
            return category
    return None


def template_categories(
    texts: pa.Array | pa.ChunkedArray, templates: list[tuple[str, re.Pattern]]
) -> pa.Array:
    """template_category of each text of a batch, one pass of each regex over the batch."""
    values = texts.fill_null("").to_pylist()
    categories: list[str | None] = [None] * len(values)
    for category, pattern in reversed(templates):  # an earlier category overwrites a later one
        for i in itertools.compress(range(len(values)), map(pattern.search, values)):
            categories[i] = category if values[i] else None
    return pa.array(categories, pa.string())


def with_flags(
    table: pa.Table, duplicates: pa.Array | pa.ChunkedArray, templates: list[tuple[str, re.Pattern]]
) -> pa.Table:
    """Append the published flags to a batch of rows: over `instruction_ja`, the templates over the
    original `instruction`, `duplicate_user_instruction_ja` from `duplicates` (the first earlier
    row with the identical text, see first_occurrences) unless the text is empty."""
    texts = table["instruction_ja"]
    empty = blank(texts)
    flags = [
        empty,
        pc.if_else(empty, pa.scalar(None, pa.string()), duplicates),
        template_categories(table["instruction"], templates),
        pc.is_null(texts),
    ]
    for field, column in zip(FLAGS, flags, strict=True):
        table = table.append_column(field, column)
    return table
