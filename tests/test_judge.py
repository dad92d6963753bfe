"""The judge parser never raises: noisy outputs give a 0-10 score or -1."""

from __future__ import annotations

import pytest

from stages.core.judge import FAILED, best_index, judge_messages, parse_score


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("The answer is accurate and fluent.\n\nRating: [[8]]", 8.0),
        ("Explanation... Rating: [[ 7.5 ]]", 7.5),
        ('Use the format "[[rating]]", e.g. [[5]]. My verdict: [[9]]', 9.0),
        ("評価: [[10]]", 10.0),
        ("Score: [6]", 6.0),
        ("I would give this 4/10 because it repeats itself.", 4.0),
        ("rating: 3", 3.0),
        ("Rating: [[0]]", 0.0),
        ("Rating: [[11]]", FAILED),
        ("Rating: [[85]]", FAILED),
        ("The response is good but I cannot decide.", FAILED),
        ("Rating: [[", FAILED),
        ("", FAILED),
        (None, FAILED),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize(
    ("scores", "best"),
    [([3.0, 9.0, 9.0, 1.0], 1), ([FAILED, 2.0], 1), ([FAILED, FAILED], None), ([], None), ([0.0], 0)],
)
def test_best_index(scores, best):
    assert best_index(scores) == best


def test_judge_messages_fill_the_template():
    [message] = judge_messages("judge-0to10", "質問です", "回答です")
    assert message["role"] == "user"
    assert "[Question]\n質問です" in message["content"]
    assert "回答です\n[The End of Assistant's Answer]" in message["content"]
    assert "$" not in message["content"]


def test_unknown_prompt_lists_the_available_ones():
    with pytest.raises(ValueError, match="prompt 'judge-1to5' not found; available: judge-0to10"):
        judge_messages("judge-1to5", "q", "a")
