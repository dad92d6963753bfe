"""The judge parser never raises: noisy outputs give a 0-10 score or -1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.config.errors import PipelineError
from stages.core.rows.judge import FAILED, MAX_SCORE, annotations, best_index, judge_messages, parse_score

MT_BENCH_PREAMBLE = (
    "Please act as an impartial judge and evaluate the quality of the response. Be as objective as "
    "possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by "
    'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)
# Pieces judges write, shuffled by hypothesis into half-formed ratings.
FRAGMENTS = st.sampled_from(
    [
        *["Rating", "Score", "score", "rating", "評価", "総合評価", "点数", "採点", " is ", ":", "："],
        *["は", "=", "**", "[[", "]]", "[", "]", "［［", "］］", "/10", "/", " out of 10", '"score": '],
        *["点", "10点中", "満点", "-", ".", " ", "\n", "\u3000", "７", "８", "0", "1", "5", "10"],
        *["11", "85", "2023", "7.5", "1e3"],
    ]
)
JUDGE_TEXT = st.text() | st.lists(FRAGMENTS | st.text(max_size=3), max_size=40).map("".join)


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
    ("text", "score"),
    [
        pytest.param(
            MT_BENCH_PREAMBLE + "The answer is correct but misses the empty-list case.\n\nRating: [[8]]",
            8.0,
            id="quoted-format-then-rating",
        ),
        pytest.param("The answer cites [2] and is mostly right. Rating: 7/10", 7.0, id="citation-then-label"),
        pytest.param("Claims [1][2] hold up.\n\nScore: [6]. See also [3].", 6.0, id="citations-around-label"),
        pytest.param("As of 2023/10 the facts are outdated. Score: 3", 3.0, id="date-then-label"),
        pytest.param("Reviewed on 3/10/2024 and 2024/10/05; nothing else to add.", FAILED, id="dates-only"),
        pytest.param("評価: 7点", 7.0, id="ja-label-points"),
        pytest.param("評価：［［８］］", 8.0, id="ja-full-width-double-bracket"),
        pytest.param("回答は概ね正確ですが、説明が冗長です。\n\n７点", 7.0, id="ja-full-width-points"),
        pytest.param("この回答の評価は6点です。", 6.0, id="ja-label-wa"),
        pytest.param("根拠[1][2]は信頼できる。総合評価は8点です。", 8.0, id="ja-citations-then-label"),
        pytest.param("点数は10点中7点です。", 7.0, id="ja-ten-chu"),
        pytest.param("丁寧な回答です。9点（10点満点）", 9.0, id="ja-manten-after"),
        pytest.param("スコア：５", 5.0, id="ja-katakana-score"),
        pytest.param("採点: [[ 3 ]]", 3.0, id="ja-saiten-double-bracket"),
        pytest.param("**評価**: ８/１０", 8.0, id="ja-bold-full-width-out-of-ten"),
        pytest.param(
            "**Explanation:** The code compiles but ignores empty input.\n\n**Rating:** **6**", 6.0, id="bold"
        ),
        pytest.param("### Verdict\n**Final Score**: **6.5**/10", 6.5, id="bold-decimal-out-of-ten"),
        pytest.param("Score: 7 out of 10", 7.0, id="out-of-ten-label"),
        pytest.param("Overall I would give this response 9 out of 10.", 9.0, id="out-of-ten-sentence"),
        pytest.param("Score (1-10): 4", 4.0, id="label-with-scale"),
        pytest.param("Using a score of 1 to 10, the overall score is 5.", 5.0, id="range-then-label"),
        pytest.param("GPT-4 did worse on this one. Grade: 2", 2.0, id="model-name-then-grade"),
        pytest.param("The answer is harmful and wrong; its rating is 0.", 0.0, id="zero-at-sentence-end"),
        pytest.param("I rate it as follows. Score: 8.", 8.0, id="period-after-score"),
        pytest.param("Rating: 10/10, flawless.", 10.0, id="ten-out-of-ten"),
        pytest.param(
            '```json\n{"explanation": "Correct, see [1][2].", "score": 6.5}\n```', 6.5, id="json-blob"
        ),
        pytest.param('{"reason": "Too short", "rating": "4"}', 4.0, id="json-string-value"),
        pytest.param("I give [[12]]... no, final answer Rating: 8/10", 8.0, id="out-of-range-falls-through"),
        pytest.param("[[7]]\n(A draft said [[70]], which is off the scale.)", 7.0, id="last-in-range"),
        pytest.param("The conclusion follows.\n[9]", 9.0, id="bare-bracket-last-resort"),
        # an unlabelled rating ("8/10", "7点", "[7]") counts only standing alone at the close of the text
        pytest.param(
            "Step 1/10 is wrong. The answer is otherwise fine.", FAILED, id="step-fraction-mid-text"
        ),
        pytest.param("See [3] for details; the answer is incomplete.", FAILED, id="citation-mid-text"),
        pytest.param(
            "The list has 3/10 items done… the rest of the task is missing.", FAILED, id="fraction-mid-text"
        ),
        pytest.param("Refer to [2] and [5].", FAILED, id="citations-closing-a-sentence"),
        pytest.param("Point 7点 of the rubric is not addressed.", FAILED, id="ja-points-mid-text"),
        pytest.param("On 3/10 the API changed; otherwise the answer holds.", FAILED, id="date-mid-text"),
        pytest.param("The figures are current as of 3/10.", FAILED, id="date-closing-a-sentence"),
        pytest.param("It gives 3/10 of the users a wrong total, which matters.", FAILED, id="fraction-of"),
        pytest.param("I'd say 8/10.", FAILED, id="unlabelled-inside-the-last-sentence"),
        pytest.param(
            "Sources checked:\n[1] MDN\n[2] PEP 8\nThe answer follows both.", FAILED, id="reference-list"
        ),
        pytest.param("改善点は、正確さ、簡潔さ、丁寧さの3点。", FAILED, id="ja-counter-closing"),
        pytest.param(
            "評価は3つの観点から行いました。全体的に良い回答です。", FAILED, id="ja-label-then-counter"
        ),
        pytest.param("評価は5段階で行います。詳細は省略します。", FAILED, id="ja-label-then-steps"),
        pytest.param("3点を付け加えます。まず、例が不足しています。", FAILED, id="ja-adding-points"),
        pytest.param(
            "The answer is correct and well organised. Overall: a solid answer. 8/10",
            8.0,
            id="closing-fraction",
        ),
        pytest.param("Step 1/10 is wrong. The rest is fine. Overall, 5/10.", 5.0, id="mid-text-then-closing"),
        pytest.param("**Overall: 8/10**", 8.0, id="closing-bold"),
        pytest.param("The steps are right but terse — 6/10!", 6.0, id="closing-after-dash"),
        pytest.param("Clear and correct.\n\n8/10 </rating>", 8.0, id="closing-html-tag"),
        pytest.param("Final verdict:\n\n**[6]**", 6.0, id="closing-bold-bracket"),
        pytest.param("See [3] for the source.\n\n[4]", 4.0, id="citation-then-closing-bracket"),
        pytest.param("Step 1/10 is wrong. Rating: [[3]]", 3.0, id="mid-text-fraction-then-double-bracket"),
        pytest.param("I'd give it a solid 7/10 overall, mainly for clarity.", 7.0, id="rating-verb-mid-text"),
        pytest.param("総合的に良い回答です。[7]", 7.0, id="ja-closing-bracket"),
        pytest.param("正確で丁寧な説明です。\n\n「８点」", 8.0, id="ja-closing-quoted-points"),
        pytest.param("丁寧です。10点中7点", 7.0, id="ja-closing-ten-chu"),
        pytest.param("この回答には7点をつけます。", 7.0, id="ja-rating-verb-tsukeru"),
        pytest.param("以上を踏まえ、8点とします。", 8.0, id="ja-rating-verb-to-suru"),
        pytest.param("Score: 85/100", FAILED, id="out-of-hundred"),
        pytest.param("Rating: 4/5 stars", FAILED, id="other-scale"),
        pytest.param("Score: -3 (the answer is harmful)", FAILED, id="negative"),
        pytest.param("Rating: [[1", FAILED, id="truncated-number"),
        pytest.param('Output your verdict as "[[rating]]".', FAILED, id="format-placeholder-only"),
        pytest.param("   \n\t ", FAILED, id="whitespace"),
        pytest.param("¯\\_(ツ)_/¯ ### ---", FAILED, id="garbage"),
        pytest.param(float("nan"), FAILED, id="missing-pandas-cell"),
    ],
)
def test_parse_score_reads_real_judge_outputs(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize(
    "text",
    [
        # a negation in the rating's clause (issue 27)
        pytest.param("I would not give it 10/10.", id="negated-rating-verb"),
        pytest.param("I wouldn't rate it 9 out of 10", id="negated-contraction"),
        pytest.param("I wouldn’t rate it 9 out of 10.", id="negated-curly-apostrophe"),
        pytest.param("I cannot give it 10/10 because the second step is wrong.", id="cannot"),
        pytest.param("There is no way I'd give it 10/10.", id="no-way"),
        pytest.param("I'd never rate it 10/10 with that bug.", id="never"),
        # a condition or a counterfactual (issue 27)
        pytest.param("If it were perfect, I would give it 10/10.", id="if-clause-before-a-comma"),
        pytest.param("Had it cited sources, it would deserve a 9/10.", id="had-it-inversion"),
        pytest.param("Were it not for the typo, I would give it 10/10.", id="were-it-inversion"),
        pytest.param("I would give it 9/10 if it cited its sources.", id="would-then-if"),
        pytest.param("I would have given it 9/10.", id="would-have"),
        pytest.param("The score would be 9 if the answer cited sources.", id="label-would-be-if"),
        pytest.param("If the answer were complete: 9/10", id="if-then-closing-fraction"),
        # Japanese: a negation right after the rating, a condition before it
        pytest.param("不十分なので10点はつけられません", id="ja-cannot-give-issue-27"),
        pytest.param("10点をつけることはできません。", id="ja-cannot-give"),
        pytest.param("評価は6点ではありません。", id="ja-label-negated"),
        pytest.param("もし出典があれば9点をつけます。", id="ja-moshi"),
        pytest.param("出典を引用していれば9点をつけるところです。", id="ja-te-ireba"),
        # a rating inside a quote is the answer's or the prompt's (issue 27)
        pytest.param(
            'The assistant\'s answer ends with "Rating: 9", which is irrelevant. '
            "Overall the response is weak.",
            id="double-quoted-label",
        ),
        pytest.param("The response says 「評価: 9」 but the reasoning is wrong.", id="ja-kagi-quoted-label"),
        pytest.param("The essay it wrote closes with 『点数は9点』.", id="ja-double-kagi"),
        pytest.param(
            "The assistant wrote “I give it 9/10” about its own essay.", id="curly-quoted-rating-verb"
        ),
        pytest.param("Its last line, `score = 8`, is dead code.", id="code-span"),
        pytest.param('Use the format "Rating: [[5]]" as asked.', id="quoted-format-example"),
    ],
)
def test_parse_score_skips_ratings_the_judge_did_not_give(text):
    assert parse_score(text) == FAILED


@pytest.mark.parametrize(
    ("text", "score"),
    [
        # the judge's own rating beside a negated, hypothetical or quoted one
        pytest.param(
            "If it were perfect I would give it 10/10, but it has two factual errors. Rating: 6",
            6.0,
            id="issue-27",
        ),
        pytest.param(
            "As it stands I'd give it 6/10; if it were perfect I would give it 10/10.",
            6.0,
            id="then-hypothetical",
        ),
        pytest.param(
            "I'd give it 8/10, but if it had tests I'd give it 10/10.", 8.0, id="contrast-ends-the-if"
        ),
        pytest.param("I would not give it 10/10; I give it 7/10.", 7.0, id="negated-then-stated"),
        pytest.param(
            "I would have given it 9/10, but it crashes. I give it 4/10.", 4.0, id="would-have-then"
        ),
        pytest.param(
            "完璧であれば10点をつけますが、実際は6点とします。", 6.0, id="ja-conditional-then-stated"
        ),
        pytest.param(
            'The assistant\'s answer ends with "Rating: 9", which is irrelevant. '
            "Overall the response is weak. [[3]]",
            3.0,
            id="issue-27-quoted",
        ),
        pytest.param(
            "I give it 4/10. The essay it wrote ends with 'Rating: 9', which is irrelevant.",
            4.0,
            id="single-quoted-label-after",
        ),
        pytest.param("Rating: 5\n\nThe answer ends with `score = 8`.", 5.0, id="code-span-after"),
        pytest.param("総合評価は4点です。回答末尾の『評価: 9』は不要です。", 4.0, id="ja-quoted-label-after"),
        pytest.param(
            r'{"explanation": "The answer says \"Rating: 9\" at the end, which is odd.", "rating": 4}',
            4.0,
            id="json-with-an-escaped-quote",
        ),
        pytest.param(
            "Score: 3. The answer copied the prompt's example:\n> Rating: 9", 3.0, id="blockquoted-answer"
        ),
        # negation words, conditions and quotes that govern no rating
        pytest.param("It is not perfect, but I'd give it 8/10.", 8.0, id="negation-in-an-earlier-clause"),
        pytest.param("There are no factual errors, so I give it 9/10.", 9.0, id="bare-no-negates-a-noun"),
        pytest.param("The code does not compile and the score is 2.", 2.0, id="negation-before-and"),
        pytest.param("If I had to rate it, I'd give it 7/10.", 7.0, id="if-i-had-to-rate"),
        pytest.param("Even if it is verbose, I'd give it 8/10.", 8.0, id="even-if"),
        pytest.param("The if/else branch is handled, so I give it 8/10.", 8.0, id="code-if"),
        pytest.param("I would give it 8/10 because it is clear.", 8.0, id="would-without-if"),
        pytest.param("評価は8点で問題ありません。", 8.0, id="ja-negation-after-a-noun"),
        pytest.param("問題がないので8点をつけます。", 8.0, id="ja-negation-before-the-rating"),
        pytest.param(
            "The assistant's answer and the user's question match; I'd give it 7/10.", 7.0, id="apostrophes"
        ),
        pytest.param(
            'The 12" model is fine; Rating: 6 for the 15" one.', 6.0, id="inch-marks-are-not-quotes"
        ),
        pytest.param('The answer is "mostly right". Rating: 7/10', 7.0, id="quote-elsewhere"),
        pytest.param('Rating: "[[7]]"', 7.0, id="label-opens-the-quote"),
        pytest.param('Rating: "7/10"', 7.0, id="label-opens-a-quoted-fraction"),
        pytest.param(
            '{"explanation": "Correct and complete. Rating: [[8]]", "rati', 8.0, id="cut-json-explanation"
        ),
        pytest.param(
            "The answer is accurate and concise.\n\n> **Final rating: 8/10**", 8.0, id="blockquoted-verdict"
        ),
        pytest.param("> Rating: [[7]]", 7.0, id="blockquoted-double-bracket"),
        # realistic judges
        pytest.param(
            MT_BENCH_PREAMBLE + "The response is correct, although it does not explain why.\n\nRating: [[7]]",
            7.0,
            id="mt-bench-negation-before-double-bracket",
        ),
        pytest.param(
            "この回答は質問に正確に答えていますが、例が不足しています。\n\n評価: [[6]]", 6.0, id="ja-mt-bench"
        ),
        pytest.param(
            "回答は丁寧ですが、もし具体例があれば9点をつけられたでしょう。\n\n評価：7点",
            7.0,
            id="ja-hypothetical-then-label",
        ),
        pytest.param(
            "**Verdict:** Not a 10/10 answer; it misses the edge case.\n\n**Rating:** 6/10",
            6.0,
            id="markdown-not-a-ten",
        ),
    ],
)
def test_parse_score_reads_the_judges_own_rating_past_negations_conditions_and_quotes(text, score):
    assert parse_score(text) == score


@settings(max_examples=300)
@given(JUDGE_TEXT)
def test_parse_score_never_raises(text):
    score = parse_score(text)
    assert score == FAILED or 0.0 <= score <= MAX_SCORE


@settings(max_examples=300)
@given(JUDGE_TEXT, st.integers(0, 100).map(lambda tenths: tenths / 10))
def test_a_final_double_bracket_rating_wins_over_any_preamble(preamble, rating):
    assert parse_score(f"{preamble}\nRating: [[{rating:g}]]") == rating


@settings(max_examples=200)
@given(st.integers(0, 10), st.integers(0, 10), st.sampled_from(['"', "“", "「", "`", "'"]))
def test_a_quoted_or_negated_rating_never_beats_the_judges_own(own, other, quote):
    close = {"“": "”", "「": "」"}.get(quote, quote)
    assert parse_score(f"Score: {own}. The answer ends with {quote}Score: {other}{close}.") == own
    assert parse_score(f"I would not give it {other}/10. I give it {own}/10.") == own


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
    with pytest.raises(PipelineError, match=r"prompt .judge-1to5. not found in .*; available: judge-0to10"):
        judge_messages("judge-1to5", "q", "a")


def test_annotations_flag_more_than_the_threshold_and_keep_failed_requests_visible():
    from stages.core.engines import FAILED as FAILED_REQUEST
    from stages.core.engines import Completion, Reply

    responses = [{"completion_tokens": n} for n in (2000, 2001, 12)]
    replies = [
        Reply([Completion("Rating: [[7]]", "stop", 9, 5)]),
        Reply([Completion("garbage", "stop", 9, 1)]),
        Reply([], FAILED_REQUEST, "HTTP 500"),
    ]
    notes = annotations(responses, replies, repetition_threshold=2000)
    assert [n["repetition_flag"] for n in notes] == [False, True, False]  # > 2000, as published
    assert [n["preference_score"] for n in notes] == [7.0, FAILED, FAILED]
    assert [n["judgement"] for n in notes] == ["Rating: [[7]]", "garbage", None]
    assert [n["response_token_length"] for n in notes] == [2000, 2001, 12]
