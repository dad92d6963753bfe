"""Row logic of sft: each release record with its instruction becomes one SFT conversation per
option set, or a reason to leave it out. The answer is the best response as score stored it: the one
the record's synthesized_multiturn_conversation starts from (the publisher's choice, ties included),
else the judge's rule; exclusions follow the published converter's options as we read them
(docs/assumptions.md). The release and its instruction sources are merged in release order, streaming."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params
from stages.core.config.release_params import SftOption
from stages.core.config.source_params import FetchParams
from stages.core.rows import fields
from stages.core.rows.first_turn import iter_first_turns
from stages.core.rows.scores import best_index
from stages.core.storage.jsonl import jsonl_gz_writer, read_jsonl_gz
from stages.core.storage.source import list_files

# why a record gets no conversation, in the order the rules are applied (counted under the first)
REASONS = (
    "template",  # exclude_template and is_template_instruction is set
    "redacted",  # exclude_redacted and LMSYS-Chat-1M marks the conversation redacted
    "no_responses",  # none in the language (empty, duplicate or untranslated instruction, failed requests)
    "no_scored_response",  # every judgement failed (preference_score -1)
    "below_min_score",  # the best response scores below min_score
    "no_second_turn",  # turns=2 and synthesized_multiturn_conversation is null (its second turn failed)
)
RESPONSES = {"ja": fields.RESPONSES, "en": fields.RESPONSES_EN}
NOTES, MULTITURN = fields.NOTES, fields.MULTITURN
USER = {"ja": "instruction_ja", "en": "instruction"}  # the user turn of each language (its source row)


def options_for(params: Params, variant: str, names: list[str] | None = None) -> dict[str, SftOption]:
    """The option sets that apply to `variant` (`names`: only these, each of which must apply)."""
    found = {k: o for k, o in params.sft.items() if o.variants is None or variant in o.variants}
    unknown = sorted(set(names or []) - set(found))
    if unknown:
        raise PipelineError(
            f"sft option sets {unknown} do not apply to {variant}; those that do: {list(found)}"
        )
    return {k: o for k, o in found.items() if names is None or k in names}


def conversation(record: dict, user: dict, option: SftOption) -> tuple[list[dict] | None, str | None]:
    """(the SFT conversation, None), or (None, the first REASONS rule that leaves the record out).

    `user`: the record's instruction_ja, instruction (the LMSYS first turn) and redacted flag."""
    if option.exclude_template and record[fields.TEMPLATE] is not None:
        return None, "template"
    if option.exclude_redacted and user["redacted"]:
        return None, "redacted"
    responses = record.get(RESPONSES[option.language])
    if not responses:
        return None, "no_responses"
    first = {"role": "user", "content": user[USER[option.language]]}
    if option.language == "en":  # one English response, not scored
        return [first, {"role": "assistant", "content": responses[0]["content"]}], None
    best = best_response(record)
    if best is None:
        return None, "no_scored_response"
    if option.min_score is not None and record[NOTES][best][fields.SCORE] < option.min_score:
        return None, "below_min_score"
    if option.turns == 1:
        return [first, {"role": "assistant", "content": responses[best]["content"]}], None
    stored = stored_conversation(record)
    if stored is None:
        return None, "no_second_turn"
    return [first, *stored], None


def best_response(record: dict) -> int | None:
    """Index of the record's best Japanese response as score stored it (score's best_index): the one
    its synthesized_multiturn_conversation starts from where it holds one, so a tie goes the
    publisher's way; else scores.best_index, the rule score applies where there is none. None where
    every judgement failed."""
    best = best_index([note[fields.SCORE] for note in record[NOTES]])
    stored = stored_conversation(record)
    if best is None or stored is None:
        return best
    contents = [response["content"] for response in record[RESPONSES["ja"]]]
    if stored[0]["role"] != "assistant" or stored[0]["content"] not in contents:
        raise SourceError(
            f"conversation {record['conversation_id']}: {MULTITURN} does not start at one of its "
            f"{RESPONSES['ja']}; the release is inconsistent (or of another version): re-run score and "
            "package"
        )
    return contents.index(stored[0]["content"])


def stored_conversation(record: dict) -> list[dict] | None:
    """The one conversation of a record's synthesized_multiturn_conversation, [assistant, user,
    assistant] or, single-turn, [assistant] ({role, content} each); also read in the older flat shape
    (score reads both). A single-turn one gives a one-turn SFT conversation (our reading of the
    published converter given this field; it is fetched, not read by this project). None where the
    record has none."""
    stored = record.get(MULTITURN)
    if not stored:
        return None
    if isinstance(stored[0], dict):  # the older flat shape: one conversation
        stored = [stored]
    if len(stored) != 1 or not stored[0]:
        raise SourceError(
            f"conversation {record['conversation_id']}: {MULTITURN} is not one conversation; the release "
            "is inconsistent (or of another version): re-run score and package"
        )
    return [{"role": turn["role"], "content": turn["content"]} for turn in stored[0]]


def release_records(path: Path, rows: int) -> Iterator[dict]:
    """The public records of a release file (Parquet or jsonl.gz), `rows` at a time."""
    if path.name.endswith(".jsonl.gz"):
        yield from read_jsonl_gz(path)
        return
    parquet = pq.ParquetFile(path)
    wanted = ["conversation_id", fields.TEMPLATE, *RESPONSES.values(), NOTES, MULTITURN]
    columns = [c for c in wanted if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=rows, columns=columns):
        yield from batch.to_pylist()


def table_rows(path: Path, columns: list[str], rows: int) -> Iterator[dict]:
    """`columns` of each row of a Parquet file (the translated table), `rows` at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
        yield from batch.to_pylist()


def lmsys_rows(root: Path, fetch: FetchParams) -> Iterator[dict]:
    """conversation_id, instruction (the first user turn) and redacted of LMSYS-Chat-1M under `root`
    (laid out as on the Hub), filtered as fetch filters it: the rows of the first-turn table."""
    spec = fetch.source.model_copy(
        update={"uri": str(root), "revision": None, "sha256": {}, "storage_options": {}}
    )
    _, base, names = list_files(spec)
    for table in iter_first_turns([Path(base) / n for n in names], fetch.filter, Counter()):
        yield from table.select(["conversation_id", "instruction", "redacted"]).to_pylist()


def merged(records: Iterable[dict], sources: list[tuple[str, Iterable[dict]]]) -> Iterator[tuple[dict, dict]]:
    """Each record with the fields of its row in every source. A source lists the release's
    conversations in release order, with others between them (skipped); one it lacks is an error."""
    readers = [(name, iter(rows)) for name, rows in sources]
    for record in records:
        cid, user = record["conversation_id"], {}
        for name, rows in readers:
            row = next((r for r in rows if r["conversation_id"] == cid), None)
            if row is None:
                raise SourceError(
                    f"{name} has no conversation {cid} after the release's previous ones: it is not the "
                    "source of this release (another release, or LMSYS-Chat-1M filtered otherwise)"
                )
            user.update(row)
        yield record, user


def write_sft(pairs: Iterable[tuple[dict, dict]], options: dict[str, SftOption], out: Path) -> dict:
    """Write <out>/<name>.jsonl.gz for each option set, one {<output_key>: [turns]} a line; return the
    counts (rows in, written and left out by reason, per option set)."""
    counts = {name: Counter() for name in options}
    rows_in = 0
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(jsonl_gz_writer(out / f"{name}.jsonl.gz")) for name in options}
        for record, user in pairs:
            rows_in += 1
            for name, option in options.items():
                turns, reason = conversation(record, user, option)
                counts[name][reason or "written"] += 1
                if turns is not None:
                    writers[name]({option.output_key: turns})
    return {
        "rows_in": rows_in,
        "sets": {
            name: {"written": c["written"], "skipped": {r: c[r] for r in REASONS}}
            for name, c in counts.items()
        },
    }
