"""Flags of translate: empty, duplicate-of, template category."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.annotate import compile_templates, duplicate_of, empty_flags, template_category
from stages.core.errors import PipelineError
from stages.core.params import load_params

ROOT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
COMPANY = "Give me an introduction over {n} words for {name}, a chemical company in {place}"
ARTICLE = "Write an article about the {kind} of {chem} {n} words in {the}chemical industry"


def test_empty_flags_tell_an_empty_instruction_from_a_failed_translation():
    assert empty_flags(["こんにちは", "", "  \n", None]) == [False, True, True, False]


def test_duplicate_points_at_the_first_identical_instruction():
    ids = ["a", "b", "c", "d", "e", "f"]
    texts = ["こんにちは", "光合成とは？", "こんにちは", "", "", "こんにちは"]
    assert duplicate_of(ids, texts) == [None, None, "a", None, None, "a"]


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


def test_bad_template_regex_names_the_category():
    with pytest.raises(PipelineError, match=r"translate\.templates\['broken'\]: bad regex"):
        compile_templates({"broken": "(unclosed"})
