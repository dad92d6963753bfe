"""What the published file settles (compare@M): figures both files give that check a default of ours.
The distinct template categories per side (translate.templates), the repetition flag against the
token length, with the thresholds that separate flagged from unflagged responses
(models.<v>.score.repetition_threshold), the longest response (models.<v>.generate.sampling.max_tokens)
and, where both files have the multi-turn field, which shared conversations are two-turn
(models.<v>.second_turn). Each side is tallied a batch at a time into its Counter of totals (keys
below), so memory grows only with the number of distinct template categories."""

from __future__ import annotations

from collections import Counter

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.release.published import ID, NOTES
from stages.core.rows import fields

SIDES = ("ours", "published")
TEMPLATE = "template:"  # totals key: "template:<category>" -> rows
FLAGGED, UNFLAGGED, UNKNOWN = "repetition:flagged", "repetition:unflagged", "repetition:unknown"
FLAGGED_MIN, UNFLAGGED_MAX = "repetition:flagged_min", "repetition:unflagged_max"  # set once seen
LONGEST, AT_LONGEST = "longest:tokens", "longest:responses"  # set once a length is seen
# per repetition_flag value: its count key, the key of the edge kept, and how the edge is kept
EDGES = ((True, FLAGGED, FLAGGED_MIN, min), (False, UNFLAGGED, UNFLAGGED_MAX, max))
HAS_MULTITURN = "multiturn_field"  # 1: the side's records have the multi-turn field


def _keep(totals: Counter, key: str, value: int, pick) -> None:
    totals[key] = pick(totals[key], value) if key in totals else value


def tally(totals: Counter, batch: pa.RecordBatch) -> None:
    """Add a batch's template categories, (response_token_length, repetition_flag) pairs and longest
    response to one side's totals."""
    for item in pc.value_counts(batch.column(fields.TEMPLATE).drop_null()).to_pylist():
        totals[TEMPLATE + item["values"]] += item["counts"]
    notes = pc.list_flatten(batch.column(NOTES))
    lengths, flags = pc.struct_field(notes, fields.TOKENS), pc.struct_field(notes, fields.REPETITION)
    known = pc.and_(lengths.is_valid(), flags.is_valid())
    totals[UNKNOWN] += len(notes) - (pc.sum(known).as_py() or 0)
    for flag, key, edge, pick in EDGES:
        chosen = pc.filter(lengths, pc.and_kleene(known, pc.equal(flags, flag)))
        totals[key] += len(chosen)
        if len(chosen):
            _keep(totals, edge, pick(pc.min_max(chosen).as_py().values()), pick)  # its min or max
    lengths = lengths.drop_null()
    if len(lengths):
        longest = pc.max(lengths).as_py()
        reach = pc.sum(pc.equal(lengths, longest)).as_py()
        if longest > totals.get(LONGEST, -1):
            totals[LONGEST], totals[AT_LONGEST] = longest, reach
        elif longest == totals[LONGEST]:
            totals[AT_LONGEST] += reach
    if fields.MULTITURN in batch.schema.names:
        totals[HAS_MULTITURN] = 1


def template_categories(totals: dict[str, Counter]) -> dict:
    """Per side the distinct is_template_instruction values with their rows (sorted by category), and
    the categories only one side has."""
    found = {
        side: {k.removeprefix(TEMPLATE): n for k, n in sorted(totals[side].items()) if k.startswith(TEMPLATE)}
        for side in SIDES
    }
    for side, other in zip(SIDES, reversed(SIDES), strict=True):
        found[f"{side}_only"] = {k: n for k, n in found[side].items() if k not in found[other]}
    return found


def repetition_side(totals: Counter, threshold: int | None = None) -> dict:
    """One side's repetition flags against response_token_length: flagged and unflagged responses
    (unknown: a null length or flag), the shortest flagged, the longest unflagged, whether one
    threshold t separates them (every flagged > t >= every unflagged) and the range of such t
    (`separating`, a bound left out where there is none), and whether `threshold` is such a t."""
    found = {"flagged": totals[FLAGGED], "unflagged": totals[UNFLAGGED], "unknown": totals[UNKNOWN]}
    low, high = totals.get(UNFLAGGED_MAX), totals.get(FLAGGED_MIN)
    found.update({"flagged_min": high} if high is not None else {})
    found.update({"unflagged_max": low} if low is not None else {})
    found["separable"] = low is None or high is None or high > low
    if found["separable"]:
        found["separating"] = {
            **({"from": low} if low is not None else {}),
            **({"to": high - 1} if high is not None else {}),
        }
    if threshold is not None:
        found["agrees"] = (
            found["separable"] and (low is None or threshold >= low) and (high is None or threshold < high)
        )
    return found


def repetition_rule(totals: dict[str, Counter], threshold: int | None = None) -> dict:
    """Per side the repetition rule its flags follow, and the configured threshold beside them."""
    found = {side: repetition_side(totals[side], threshold) for side in SIDES}
    return found | ({"repetition_threshold": threshold} if threshold is not None else {})


def longest_response(totals: dict[str, Counter], max_tokens: int | None = None) -> dict:
    """Per side the largest response_token_length (Japanese responses) and how many responses reach
    it (left out where a side has none), and the configured max_tokens beside them."""
    found = {
        side: {"tokens": totals[side][LONGEST], "responses": totals[side][AT_LONGEST]}
        if LONGEST in totals[side]
        else {"responses": 0}
        for side in SIDES
    }
    return found | ({"max_tokens": max_tokens} if max_tokens is not None else {})


def has_multiturn(totals: dict[str, Counter]) -> bool:
    """Both sides' records have the multi-turn field (Gemma-2): which ones are two-turn can be compared."""
    return all(totals[side][HAS_MULTITURN] for side in SIDES)


TWO_TURN = ("both", "ours_only", "published_only", "neither")


def two_turn_ids(db: duckdb.DuckDBPyConnection) -> dict:
    """On the conversation_ids both sides hold (tables `ours` and `published` of compare's summary
    rows, `turns`: assistant turns of the multi-turn entry), those two-turn on both sides, on ours
    only, on published only, on neither, and the share on which the sides agree (left out over none)."""
    ours, theirs = "coalesce(o.turns, 0) >= 2", "coalesce(p.turns, 0) >= 2"
    query = f"""SELECT count(*), count(*) FILTER ({ours} AND {theirs}),
        count(*) FILTER ({ours} AND NOT {theirs}), count(*) FILTER (NOT {ours} AND {theirs}),
        count(*) FILTER (NOT {ours} AND NOT {theirs}) FROM ours o JOIN published p ON o.{ID} = p.{ID}"""
    shared, *counts = db.sql(query).fetchall()[0]
    found = {"shared": shared, **dict(zip(TWO_TURN, counts, strict=True))}
    if shared:
        found["agreement"] = round((found["both"] + found["neither"]) / shared, 6)
    return found


def figures(
    totals: dict[str, Counter],
    joined: dict,
    repetition_threshold: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """compare@M's metrics of what the published file settles; two_turn_ids only where both sides have
    the multi-turn field (`joined` holds it then)."""
    found = {
        "template_categories": template_categories(totals),
        "repetition_rule": repetition_rule(totals, repetition_threshold),
        "longest_response": longest_response(totals, max_tokens),
    }
    return found | ({"two_turn_ids": joined["two_turn_ids"]} if "two_turn_ids" in joined else {})
