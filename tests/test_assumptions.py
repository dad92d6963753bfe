"""docs/assumptions.md is the register of what the public material does not give: no "as published"
without a citation, every key it names exists in the production composition, every local link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.params import validate
from stages.core.release import card

ROOT = Path(__file__).resolve().parent.parent
REGISTER = ROOT / "docs" / "assumptions.md"
CLAIM = re.compile(r"as published", re.IGNORECASE)
# A citation: a [V] or [V: ...] source tag, an http(s) URL, or a link to the register (a markdown
# link or a path ending in docs/assumptions.md, or assumptions.md from docs/ itself).
CITATION = re.compile(r"\[V\]|\[V:|https?://\S+|(?:\]\(|\b)(?:[\w./]*/)?assumptions\.md\b")
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


def sources() -> list[tuple[str, str]]:
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),  # every page of docs/, the register included
        ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "conf").rglob("*.yaml")),
    ]
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in files] + [
        ("stages/core/release/card.py (card text)", card_text())
    ]


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
    ],
)
def test_a_citation_is_a_v_tag_a_url_or_a_link_to_the_register(text: str, bad: bool):
    assert bool(uncited(text)) is bad


def test_no_as_published_without_a_citation():
    assert {"README.md", "docs/pipeline.md", "docs/releases.md"} <= {name for name, _ in sources()}
    found = [f"{name}: {claim}" for name, text in sources() for claim in uncited(text)]
    assert not found, "cite [V]/a URL/docs/assumptions.md, or reword:\n" + "\n".join(found)


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
