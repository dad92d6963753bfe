"""docs/assumptions.md is the register of what the public material does not give: its contents list
every section, no "as published" without a citation (in the docs, conf/, the card, and the comments
and docstrings of stages/ and scripts/), every key it names exists in the production composition,
every local link resolves."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.params import validate
from stages.core.release import card
from tests.test_docs import slug

ROOT = Path(__file__).resolve().parent.parent
REGISTER = ROOT / "docs" / "assumptions.md"
SECTION = re.compile(r"^## (\d+)\. (.+)$", re.MULTILINE)
CONTENTS_ROW = re.compile(r"^\| (\d+) \| \[([^\]]+)\]\(#([^)]+)\) \|", re.MULTILINE)
# A claim that something is the publisher's: "as published", "as the published <thing> ...", "as the
# publisher ...", and the published shape or format of something.
CLAIM = re.compile(r"\bas (?:in )?(?:the )?publish(?:ed|er)\b|\bpublished (?:shape|format)\b", re.IGNORECASE)
# A citation: a [V] or [V: ...] source tag, an http(s) URL, or a reference to the register: a markdown
# link or a path ending in docs/assumptions.md (or assumptions.md from docs/ itself), "register <N>",
# or, inside the register, a link to one of its sections.
CITATION = re.compile(
    r"\[V\]|\[V:|https?://\S+|(?:\]\(|\b)(?:[\w./]*/)?assumptions\.md\b|\bregister \d+|\]\(#\d+-"
)
# A sentence ends at ". ", "; " is not an end; a blank line or a markdown heading ends a paragraph.
SENTENCE_END = re.compile(r"[.!?](?=\s)|\n\s*\n|\n#")
# A params key in backticks: a top-level section, then dotted parts; <v>, <name>, <S> match any key.
KEY = re.compile(r"`((?:paths|fetch|decrypt|translate|engine|release|sft|published|models)(?:\.[\w<>+-]+)+)`")
PLACEHOLDER = re.compile(r"^<\w+>$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def sentence(text: str, at: int) -> str:
    """The sentence of `text` around index `at`, wrapped lines joined."""
    starts = [m.end() for m in SENTENCE_END.finditer(text, 0, at)]
    end = SENTENCE_END.search(text, at)
    return text[starts[-1] if starts else 0 : end.end() if end else len(text)]


def line(text: str, at: int) -> str:
    return text[text.rfind("\n", 0, at) + 1 : (text.find("\n", at) + 1 or len(text) + 1) - 1]


def uncited(text: str) -> list[str]:
    """Each "as published" whose line and sentence hold no citation, as its line."""
    return [
        line(text, m.start()).strip()
        for m in CLAIM.finditer(text)
        if not CITATION.search(line(text, m.start())) and not CITATION.search(sentence(text, m.start()))
    ]


def card_text() -> str:
    """The card's own text: its module (FIELDS, LMSYS, FAMILIES) and the licences it renders."""
    producers = {"models": {"generate": {"model": "google/gemma-2-27b-it"}, "t": {"model": "meta-llama/x"}}}
    return "\n\n".join(
        [
            (ROOT / "stages/core/release/card.py").read_text(encoding="utf-8"),
            *card.licences(producers),
            *card.FIELDS.values(),
        ]
    )


def python_prose(source: str) -> str:
    """The comments and docstrings of a Python module as prose: a run of comment lines on consecutive
    lines is one paragraph (a sentence may go on from one line to the next), each docstring another,
    paragraphs apart. Code and other string literals are left out."""
    paragraphs: list[list[str]] = []
    last = -1
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row, text = token.start[0], token.string.lstrip("#").strip()
        if row == last + 1 and paragraphs:
            paragraphs[-1].append(text)
        else:
            paragraphs.append([text])
        last = row
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = [ast.get_docstring(n) for n in ast.walk(ast.parse(source)) if isinstance(n, kinds)]
    return "\n\n".join(["\n".join(p) for p in paragraphs] + [d for d in docstrings if d])


def code_sources() -> list[tuple[str, str]]:
    """The comments and docstrings of every module under stages/ and scripts/."""
    files = sorted(p for folder in ("stages", "scripts") for p in (ROOT / folder).rglob("*.py"))
    return [
        (f"{p.relative_to(ROOT)} (comments and docstrings)", python_prose(p.read_text(encoding="utf-8")))
        for p in files
    ]


def sources() -> list[tuple[str, str]]:
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),  # every page of docs/, the register included
        ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "conf").rglob("*.yaml")),
    ]
    return (
        [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in files]
        + [("stages/core/release/card.py (card text)", card_text())]
        + code_sources()
    )


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("flag more than 2000 tokens, as published", True),
        ("# ja for llama31, ja+unsafe for gemma3, as published)", True),
        ("parse (as published [V: https://huggingface.co/x])", False),
        ("2000, as published [V]. Next", False),
        ("the rule, as published (see\n  [the register](../docs/assumptions.md)).", False),
        ("as published.\nA URL in the next sentence https://x.org", True),
        ("As Published by nobody", True),
        ("columns, as the published merge scripts make it", True),
        ("the best response, as the publisher chose it", True),
        ("Each row holds the published shape, a list of one conversation", True),
        ("the shape, as published (register 32)", False),
        ("the merge, as the published scripts make it (docs/assumptions.md 19)", False),
        ("the published file", False),  # naming the file is no claim about it
    ],
)
def test_a_citation_is_a_v_tag_a_url_or_a_link_to_the_register(text: str, bad: bool):
    assert bool(uncited(text)) is bad


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("X = 1  # a list of one conversation (as published)\n", True),
        ('def f():\n    """Flags as the published pipeline would have them."""\n', True),
        ('"""A module.\n\nThe order is as published.\n"""\n', True),
        ("# the shape, as published, is\n# [[assistant]] [V: https://x.org/card]\nX = 1\n", False),
        ("# as published; see\n# docs/assumptions.md 32\nX = 1\n", False),
        ("# as published\nX = 1\n\n# [V: https://x.org] on another comment, apart\n", True),
        ('X = "as published"  # code, not prose: a string literal that is no docstring\n', False),
    ],
)
def test_comments_and_docstrings_of_code_are_read_for_claims(source: str, bad: bool):
    assert bool(uncited(python_prose(source))) is bad


def test_no_as_published_without_a_citation():
    names = {name for name, _ in sources()}
    assert {"README.md", "docs/pipeline.md", "docs/releases.md"} <= names
    assert {
        "stages/core/rows/records.py (comments and docstrings)",
        "scripts/make_sample.py (comments and docstrings)",
    } <= names
    found = [f"{name}: {claim}" for name, text in sources() for claim in uncited(text)]
    assert not found, "cite [V]/a URL/docs/assumptions.md, or reword:\n" + "\n".join(found)


def contents_problems(text: str) -> list[str]:
    """What is wrong with a register's Contents table: sections not numbered 1, 2, ...; a `## N.` section
    without its row (number, title, anchor), in order; a row without its section."""
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    sections = [(int(n), title, slug(f"{n}. {title}")) for n, title in SECTION.findall(text)]
    rows = [(int(n), title, anchor) for n, title, anchor in CONTENTS_ROW.findall(contents)]
    found = [] if [s[0] for s in sections] == list(range(1, len(sections) + 1)) else ["numbering"]
    if rows != sections:
        found += [f"section without its row: {s}" for s in sections if s not in rows]
        found += [f"row without its section: {r}" for r in rows if r not in sections]
        found += [] if found else ["rows out of order"]
    return found


SYNTHETIC = """## Contents

| # | assumption | key | default |
|---|---|---|---|
| 1 | [One](#1-one) | `a.b` | x |
{row2}
## 1. One

## 2. Two `b`
"""


@pytest.mark.parametrize(
    ("row2", "bad"),
    [
        ("| 2 | [Two `b`](#2-two-b) | `a.c` | y |", False),
        ("", True),  # the table stops before the last section
        ("| 2 | [Two](#2-two-b) | `a.c` | y |", True),  # another title
        ("| 2 | [Two `b`](#2-two) | `a.c` | y |", True),  # an anchor that is not the heading's
    ],
)
def test_a_contents_table_that_misses_a_section_is_found(row2: str, bad: bool):
    assert bool(contents_problems(SYNTHETIC.format(row2=row2))) is bad


def test_the_contents_table_lists_every_section_in_order():
    problems = contents_problems(REGISTER.read_text(encoding="utf-8"))
    assert not problems, "docs/assumptions.md's Contents: " + "; ".join(problems)


def test_every_section_gives_a_default_a_reason_and_what_compare_shows():
    text = REGISTER.read_text(encoding="utf-8")
    parts = re.split(r"^## (?=\d+\. )", text, flags=re.MULTILINE)[1:]
    assert parts
    for part in parts:
        title = part.splitlines()[0]
        for label in ("**Default:**", "**Why:**", "**If wrong:**"):
            assert f"- {label}" in part, f"{title}: no {label}"
        wrong = part.split("**If wrong:**", 1)[1]
        assert "compare@M" in wrong or "nothing in the published files settles it" in wrong, title


def _exists(node: object, parts: list[str]) -> bool:
    if not parts:
        return True
    if not isinstance(node, dict):
        return False
    head, rest = parts[0], parts[1:]
    if PLACEHOLDER.match(head):
        return any(_exists(value, rest) for value in node.values())
    return head in node and _exists(node[head], rest)


def test_every_key_the_register_names_is_in_the_production_params():
    params = validate(yaml.safe_load(compose_params([]))).model_dump()  # with the models' defaults
    keys = sorted(set(KEY.findall(REGISTER.read_text(encoding="utf-8"))))
    assert len(keys) >= 20, keys
    missing = [key for key in keys if not _exists(params, key.split("."))]
    assert not missing, f"docs/assumptions.md names keys that params.yaml lacks: {missing}"


def test_every_local_link_in_the_register_resolves():
    links = LINK.findall(REGISTER.read_text(encoding="utf-8"))
    local = [t.split("#")[0] for t in links if not re.match(r"[a-z]+:|#", t)]
    assert local, "the register links no local file"
    broken = [t for t in local if not (REGISTER.parent / t).exists()]
    assert not broken, f"docs/assumptions.md links missing files: {broken}"


def test_the_readme_table_says_faithful_with_a_v_or_links_the_register_for_each_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Which defaults are faithful and which are assumptions", 1)[1].split(
        "\n## ", 1
    )[0]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| default")
    ]
    assert len(rows) >= 10
    for row in rows:
        verdict = row.rstrip(" |").rsplit(" | ", 1)[1]
        if "assumed" in verdict or "ours" in verdict or "extension" in verdict:
            assert "](docs/assumptions.md#" in verdict, row
        if "faithful" in verdict:
            assert "[V" in verdict, row
