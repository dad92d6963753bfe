"""Row logic of translate: empty, duplicate-of, template and failed-translation flags, a batch of
rows at a time (vectorised where the rule allows it; Python only for the template regexes)."""

from __future__ import annotations

import functools
import itertools
import re
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.errors import PipelineError
from stages.core.params import TemplateRule

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


@dataclass(frozen=True)
class Template:
    """A compiled translate.templates rule: its category, the column it reads, its regexes."""

    category: str
    field: str
    patterns: tuple[re.Pattern, ...]

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
        compiled.append(Template(rule.category, rule.field, tuple(patterns)))
    return compiled


def template_category(row: dict, templates: list[Template]) -> str | None:
    """The category of the first rule that matches `row` (instruction, instruction_ja), else None."""
    return next((t.category for t in templates if t.matches(row.get(t.field))), None)


def template_categories(table: pa.Table, templates: list[Template]) -> pa.Array:
    """template_category of each row of a batch, one pass of each regex over its column."""
    categories: list[str | None] = [None] * table.num_rows
    columns = {t.field: table[t.field].fill_null("").to_pylist() for t in templates}
    for template in reversed(templates):  # an earlier rule overwrites a later one
        values = columns[template.field]
        for pattern in template.patterns:
            for i in itertools.compress(range(len(values)), map(pattern.search, values)):
                categories[i] = template.category if values[i] else None
    return pa.array(categories, pa.string())


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
