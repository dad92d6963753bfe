"""compare@M's report (Markdown): the two files, the overlap, the agreement on the shared rows with
example conversation_ids, each side's figures, what the published file settles (release/settled.py)
and the distributions side by side (comparison.py computes them all)."""

from __future__ import annotations

from stages.core.release.comparison import PLOTS, SIDES
from stages.core.rows import fields

TITLES = {
    "scores": fields.SCORE,
    "response_tokens": fields.TOKENS,
    "responses_per_row": "responses",
    "response_en_chars": "English response length (characters)",
}


SIDE_ROWS = [  # the report's per-side table: (label, metric key)
    ("rows", "rows"),
    ("responses", "responses"),
    ("responses per row", "responses_per_row"),
    ("mean preference_score", "mean_preference_score"),
    ("judgements failed (score -1)", "judgements_failed"),
    ("mean response_token_length", "mean_response_token_length"),
    ("repetition_flag set", "repetition_flags"),
    ("instructions with responses", "instructions_with_responses"),
    ("English responses", "responses_en"),
    ("instructions with English responses", "instructions_with_responses_en"),
]
KINDS = [
    ("differ", "differ"),
    ("set_ours_only", "set in ours only"),
    ("set_published_only", "set in published only"),
    ("set_both_differ", "set in both, to different values"),
]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("–" if c is None else str(c) for c in row) + " |" for row in rows]


def _extra_sections(found: dict) -> list[str]:
    """The report's card figures, multi-turn entries and redacted conversations."""
    with_card = any("card" in row for row in found["figures"].values())
    lines = ["", "## The card's figures ([I]: instructions with at least one response)", ""]
    lines += _table(
        ["figure", "ours", "published", *(["card"] if with_card else [])],
        [
            [k, v["ours"], v["published"], *([v.get("card")] if with_card else [])]
            for k, v in found["figures"].items()
        ],
    )
    lines += ["", "## Multi-turn entries (by assistant turns)", ""]
    keys = ["entries", "single_turn", "two_turn", "other", "share_two_turn"]
    lines += _table(
        ["", "ours", "published"], [[k, *(found[s]["multiturn"].get(k) for s in SIDES)] for k in keys]
    )
    lines += ["", "## Conversations LMSYS redacted (PII), in our translated subset", ""]
    lines += _table(["", "count"], [[k, v] for k, v in found["redacted"].items()])
    return lines


def _named(categories: dict[str, int]) -> str:
    return ", ".join(f"{k} ({n})" for k, n in categories.items()) or "none"


def _rule(side: str, rule: dict) -> str:
    """A side's repetition flags in words: the counts, the edges, and the thresholds separating them."""
    flagged = f"{rule['flagged']} flagged" + (
        f" (the shortest {rule['flagged_min']} tokens)" if "flagged_min" in rule else ""
    )
    unflagged = f"{rule['unflagged']} unflagged" + (
        f" (the longest {rule['unflagged_max']} tokens)" if "unflagged_max" in rule else ""
    )
    if not rule["separable"]:
        return f"{side} {flagged}, {unflagged}: no single threshold separates them"
    bounds = rule["separating"]
    upto = f"to {bounds['to']}" if "to" in bounds else "up"
    return (
        f"{side} {flagged}, {unflagged}: flagged means more than t tokens for any t from "
        f"{bounds.get('from', 0)} {upto}"
    )


def _settled(name: str, found: dict) -> list[str]:
    """The report's section "What the published file settles": a line per figure naming the default
    it checks."""
    categories, rule = found["template_categories"], found["repetition_rule"]
    longest, threshold = found["longest_response"], rule.get("repetition_threshold")
    lines = ["", "## What the published file settles", ""]
    lines.append(
        f"- Template categories (checks `translate.templates`): published {len(categories['published'])}: "
        f"{_named(categories['published'])}; ours {len(categories['ours'])}: {_named(categories['ours'])}; "
        f"only in published: {_named(categories['published_only'])}; only in ours: "
        f"{_named(categories['ours_only'])}."
    )
    verdict = ""
    if threshold is not None:
        agrees = "agrees with" if rule["published"]["agrees"] else "disagrees with"
        verdict = f"; the published file {agrees} {threshold}"
    lines.append(
        f"- Repetition flag against response_token_length (checks `models.{name}.score.repetition_threshold`"
        f"{f' = {threshold}' if threshold is not None else ''}): "
        f"{_rule('published', rule['published'])}; {_rule('ours', rule['ours'])}{verdict}."
    )
    sides = [
        f"{side} {longest[side]['tokens']} tokens ({longest[side]['responses']} responses reach it)"
        if "tokens" in longest[side]
        else f"{side} no responses"
        for side in ("published", "ours")
    ]
    max_tokens = f" = {longest['max_tokens']}" if "max_tokens" in longest else ""
    lines.append(
        f"- Longest Japanese response (checks `models.{name}.generate.sampling.max_tokens`{max_tokens}): "
        f"{'; '.join(sides)}."
    )
    if (turns := found.get("two_turn_ids")) is None:
        lines.append(
            f"- Two-turn conversations (checks `models.{name}.second_turn`): not settled here, "
            "one side or both have no multi-turn field."
        )
    else:
        share = f": agreement {turns['agreement']}" if "agreement" in turns else ""
        lines.append(
            f"- Two-turn conversations (checks `models.{name}.second_turn`, which conversations get a second "
            f"turn): of {turns['shared']} shared conversations, two-turn on both sides {turns['both']}, "
            f"ours only {turns['ours_only']}, published only {turns['published_only']}, neither "
            f"{turns['neither']}{share}."
        )
    return lines


def report(name: str, ours: dict, published: dict, found: dict, joined: dict, tables: dict) -> str:
    """compare@M's report (Markdown): the two files, the overlap, the agreement on shared rows with
    example conversation_ids, the card's figures, multi-turn entries, redacted conversations, what the
    published file settles, and the distributions side by side."""
    where = f"{published['uri']}/{published['path']}" + (
        f" @ {published['revision']}" if published["revision"] else ""
    )
    lines = [f"# compare@{name}: our release and the published file", ""]
    lines += _table(
        ["", "ours", "published"],
        [["file", f"`{ours['path']}`", f"`{where}`"], ["sha256", ours["sha256"], published["sha256"]]]
        + [[label, found["ours"].get(key), found["published"].get(key)] for label, key in SIDE_ROWS],
    )
    rows = found["rows"]
    lines += ["", "## Rows (by conversation_id)", ""]
    lines += _table(["in both", "in ours only", "in published only"],
                    [[rows["both"], rows["only_ours"], rows["only_published"]]])  # fmt: skip
    lines += ["", f"## Agreement on the {rows['both']} shared rows", ""]
    agreement = found.get("agreement", {})
    body = []
    for field, kinds in joined["differ"].items():
        for kind, label in KINDS:
            if kind in kinds:
                count, examples = kinds[kind]
                share = agreement.get(field) if kind == "differ" else None
                body.append([field if kind == "differ" else "", share, label, count, ", ".join(examples)])
    lines += _table(["field", "agreement", "rows that", "count", "examples (conversation_id)"], body)
    lines += _extra_sections(found)
    lines += _settled(name, found)
    for table, (field, count) in PLOTS.items():
        by_label: dict[str, dict] = {}
        for row in tables[table]:
            by_label.setdefault(row[field], {})[row["source"]] = row[count]
        lines += ["", f"## {count} by {TITLES[table]}", ""]
        lines += _table(
            [field, "ours", "published"], [[k, v["ours"], v["published"]] for k, v in by_label.items()]
        )
    return "\n".join(lines) + "\n"
