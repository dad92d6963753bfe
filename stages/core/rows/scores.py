"""The preference-score rules every stage shares, with no engine behind them: the score of a failed
judgement and the best response of a row (score, the SFT converter, the published judgements)."""

from __future__ import annotations

SCORE_FAILED = -1.0  # preference_score where the judge failed or its output holds no rating


def best_index(scores: list[float]) -> int | None:
    """Index of the highest valid score (the first on ties); None when every judgement failed."""
    valid = [(score, -i) for i, score in enumerate(scores) if score != SCORE_FAILED]
    return -max(valid)[1] if valid else None
