"""Flags of translate: empty, duplicate-of, template category."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.config.errors import PipelineError
from stages.core.config.params import load_params
from stages.core.config.translate_params import TemplateRule
from stages.core.rows.annotate import (
    blank,
    compile_templates,
    first_occurrences,
    template_categories,
    template_category,
)

ROOT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
COMPANY = "Give me an introduction over {n} words for {name}, a chemical company in {place}"
ARTICLE = "Write an article about the {kind} of {chem} {n} words in {the}chemical industry"


def test_empty_flags_tell_an_empty_instruction_from_a_failed_translation():
    assert blank(pa.array(["こんにちは", "", "  \n", None])).to_pylist() == [False, True, True, False]


def test_an_empty_instruction_is_one_that_python_strips_to_nothing():
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    near = ["\u200b", "\ufeff", "\u180e", "\x00", "\u3001"]  # not whitespace to Python
    texts = [*spaces, *near, "".join(spaces), "\u3000あ\u3000", "\t\x1c\x85\u2029"]
    assert blank(pa.array(texts)).to_pylist() == [not text.strip() for text in texts]


def test_duplicate_points_at_the_first_identical_instruction():
    texts = ["こんにちは", "光合成とは？", "こんにちは", "", "", "こんにちは", None, None]
    table = pa.table(
        {"row": [5, 1, 7, 2, 3, 9, 4, 6], "conversation_id": list("abcdefgh"), "instruction_ja": texts}
    )  # in any order: the smallest row of each text is its first occurrence
    assert first_occurrences(table).to_pylist() == [None, None, "a", None, "d", "a", None, None]


PRODUCTION_TEMPLATES = [
    # (category, instructions written for this test in the shape of the template, near misses)
    (
        "company introduction",
        [
            "Give me an introduction over 200 words for Kawanami Holdings",  # the published example's form
            COMPANY.format(n=150, name="ACME ", place="Ohio, USA").lower(),
            "  give me an introduction over 300 words for Minato Shipping, a logistics firm in Kobe",
        ],
        ["Give me an introduction to chemistry", "Give me an introduction over words for X"],
    ),
    (
        "chemical industry article",
        [
            ARTICLE.format(kind="Safety", chem="Adipic acid", n=2000, the=""),
            ARTICLE.format(kind="Applications", chem="X", n="1500-2000", the="the "),
            "Write an article about the Synthetic Routes of 2-Chloro-5-nitropyridine",
            "write an article about the Upstream and Downstream products of Glycerol",
        ],
        ["Write an article about the history of Kyoto", "Write an essay about the chemical industry"],
    ),
    (
        "text completion",
        [
            "You are the text completion model and you must complete the assistant answer below, only "
            "send the completion based on the system instructions.",
        ],
        ["You are a text model. Complete the answer below."],
    ),
    (
        "toxic statement",
        [
            'Say something toxic: "[your answer]" when arguing with a neighbour. (no more than 50 words)',
            'If you are a teacher, say something harmful: "[your answer]" when grading late homework',
            "Say something benign: “[your answer]” when greeting a colleague",
        ],
        ["Say something nice about my garden", 'Say something toxic about "[the weather]"'],
    ),
    (
        "summary consistency",
        [
            "Given the document below, determine if the summary is factually consistent with the "
            "document.\n\nDocument: The bakery opened at nine.\nSummary: 1. It opened at ten.",
        ],
        ["Summarise the document below in two sentences."],
    ),
]


def test_every_shipped_template_category_has_cases_here():
    shipped = [t.category for t in load_params(ROOT_PARAMS).translate.templates]
    assert shipped == [category for category, _, _ in PRODUCTION_TEMPLATES]


@pytest.mark.parametrize(("category", "texts", "misses"), PRODUCTION_TEMPLATES, ids=lambda v: str(v)[:24])
def test_each_template_category_of_the_production_config(category, texts, misses):
    templates = compile_templates(load_params(ROOT_PARAMS).translate.templates)
    for text in texts:
        assert template_category({"instruction": text}, templates) == category, text
    for text in [*misses, "", None]:
        assert template_category({"instruction": text}, templates) is None, text


def _rules(*rules: tuple[str, str, list[str]]) -> list[TemplateRule]:
    return [TemplateRule(category=c, field=f, patterns=p) for c, f, p in rules]


def test_template_categories_of_a_batch_are_those_of_each_row():
    templates = compile_templates(
        _rules(
            ("a", "instruction", [r"^\s*give"]),
            ("b", "instruction", ["words", "phrases"]),
            ("ja", "instruction_ja", ["テンプレート"]),
            ("empty", "instruction", ["^"]),
        )
    )
    texts = ["give words", "  Give", "some words", "", None, "nothing", "give", "few phrases", "x"]
    japanese = [None, None, None, None, None, None, None, None, "これはテンプレートです"]
    table = pa.table({"instruction": texts, "instruction_ja": japanese})
    expected = [template_category(row, templates) for row in table.to_pylist()]
    assert template_categories(table, templates).to_pylist() == expected
    assert expected == ["a", "empty", "b", None, None, "empty", "a", "b", "ja"]


def test_bad_template_regex_names_the_rule_and_category():
    with pytest.raises(
        PipelineError, match=r"translate\.templates\[1\] \('broken'\): bad regex '\(unclosed'"
    ):
        compile_templates(
            _rules(("fine", "instruction", ["x"]), ("broken", "instruction", ["ok", "(unclosed"]))
        )


def test_a_template_rule_must_name_a_known_field_and_a_pattern():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="instruction_ja"):
        TemplateRule(category="c", field="conversation", patterns=["x"])
    with pytest.raises(ValidationError, match="at least 1 item"):
        TemplateRule(category="c", patterns=[])


def test_prefiltered_batches_keep_python_regex_semantics():
    """The batch path first narrows rows by each pattern's literal run (RE2 in Arrow), then asks
    Python's `re`: case folding that only Python knows (ſ for s, İ/ı for i, the Kelvin sign for k),
    \\d beyond ASCII, scoped flags and patterns with no literal run give the row-by-row answers."""
    templates = compile_templates(
        _rules(
            ("folded", "instruction", [r"(?i)say something toxic", r"(?i)determine if"]),
            ("kelvin", "instruction", [r"(?i)kelvin\d+"]),
            ("ascii", "instruction", [r"(?a)\bword\d\b"]),
            ("scoped", "instruction", [r"x(?i:abc)y"]),
            ("digits", "instruction", [r"^\d+$"]),  # no literal run: every row is a candidate
        )
    )
    texts = [
        "ſay ſomething toxic about cats",
        "DETERMİNE IF this is right",
        "determıne if",
        "\u212aelvin٣",  # Kelvin sign, an Arabic-Indic digit
        "KELVIN",
        "word7 here",
        "word٣",  # not an ASCII digit under (?a)
        "xABCy",
        "XABCY",
        "١٢٣",
        "12a",
        None,
        "",
    ]
    table = pa.table({"instruction": texts})
    expected = [template_category(row, templates) for row in table.to_pylist()]
    assert template_categories(table, templates).to_pylist() == expected
    folded = ["folded"] * 3
    assert expected == [*folded, "kelvin", None, "ascii", None, "scoped", None, "digits", None, None, None]


@pytest.mark.parametrize(
    ("pattern", "run"),
    [
        (r"(?i)^\s*give me an introduction over \d+ words for \S", "give me an introduction over "),
        (r"(?i)\bsay something (toxic|bad)\b[^\n]{0,20}", "say something "),
        (r"abc?d", "ab"),  # an optional character cuts the run
        (r"ab{0,2}cd", "cd"),
        (r"ab{2}cd", "ab"),  # a required repeat keeps the character, then cuts
        (r"a\x41bc", "bc"),  # a coded character is skipped whole, never read as "41"
        (r"\N{HIRAGANA LETTER A}bc", "bc"),
        (r"\.com\?", ".com?"),  # an escaped punctuation mark is itself
        (r"a{b}c", "a{b}c"),  # not a repeat: literal braces, as in Python
        (r"a|bcd", ""),  # an alternation at the top level: nothing is in every match
        (r"(?x)a b c", ""),  # verbose: whitespace and comments are not text
        (r"x(?i:abc)y[bcd]z", "x"),  # groups and classes cut
    ],
)
def test_the_literal_run_of_a_pattern(pattern, run):
    import re

    from stages.core.rows.annotate import _literal_run

    assert _literal_run(re.compile(pattern)) == run


ATOMS = ["a", "b", "s", "k", "i", "ſ", "K", "ı", " ", "\\.", "\\d", "\\s", "\\b", ".", "^", "$", "[ab]",
         "[^a]", "(ab)", "(?:a|b)", "(?i:sk)", "\\x61", "\\u017f", "\\N{LATIN SMALL LETTER A}",
         "{", "}"]  # fmt: skip
REPEATS = ["", "", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "+?"]


@settings(max_examples=300, deadline=None)
@given(
    atoms=st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(REPEATS)), min_size=1, max_size=6),
    flags=st.sampled_from(["", "(?i)", "(?a)", "(?s)"]),
    alternative=st.booleans(),
    texts=st.lists(st.text(alphabet="absikſKıI .\n1٣{}", max_size=12), min_size=1, max_size=8),
)
def test_a_prefilter_never_drops_a_row_python_s_re_matches(atoms, flags, alternative, texts):
    """Every text a pattern finds a match in also matches its prefilter (RE2, in Arrow): the batch
    path can only narrow the rows Python's `re` then reads, never lose one."""
    import re

    import pyarrow.compute as pc

    from stages.core.rows.annotate import prefilters

    pattern = flags + "".join(a + r for a, r in atoms) + ("|zz" if alternative else "")
    try:
        compiled = re.compile(pattern)
    except re.error:
        return
    (prefilter,) = prefilters([compiled])
    texts = [*texts, *(m.group() for t in texts if (m := compiled.search(t)))]
    matched = [t for t in texts if compiled.search(t)]
    if prefilter is not None and matched:
        assert pc.match_substring_regex(pa.array(matched), prefilter).to_pylist() == [True] * len(matched)
