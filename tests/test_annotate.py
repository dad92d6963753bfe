"""Flags of translate: empty, duplicate-of, template category."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pytest

from stages.core.annotate import (
    blank,
    compile_templates,
    first_occurrences,
    template_categories,
    template_category,
)
from stages.core.errors import PipelineError
from stages.core.params import load_params

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


@pytest.mark.parametrize(
    ("text", "category"),
    [
        (COMPANY.format(n=200, name="Kawanami Chemical", place="Osaka"), "company introduction"),
        (COMPANY.format(n=150, name="ACME ", place="Ohio, USA").lower(), "company introduction"),
        (ARTICLE.format(kind="Safety", chem="Adipic acid", n=2000, the=""), "chemical industry article"),
        (
            ARTICLE.format(kind="Applications", chem="X", n="1500-2000", the="the "),
            "chemical industry article",
        ),
        ("Give me an introduction to chemistry", None),
        ("", None),
        (None, None),
    ],
)
def test_template_categories_of_the_production_config(text, category):
    templates = compile_templates(load_params(ROOT_PARAMS).translate.templates)
    assert template_category(text, templates) == category


def test_template_categories_of_a_batch_are_those_of_each_row():
    templates = compile_templates({"a": r"^\s*give", "b": "words", "empty": "^"})
    texts = ["give words", "  Give", "some words", "", None, "nothing", "give"]
    expected = [template_category(text, templates) for text in texts]
    assert template_categories(pa.array(texts, pa.string()), templates).to_pylist() == expected
    assert expected == ["a", "empty", "b", None, None, "empty", "a"]


def test_bad_template_regex_names_the_category():
    with pytest.raises(PipelineError, match=r"translate\.templates\['broken'\]: bad regex"):
        compile_templates({"broken": "(unclosed"})
