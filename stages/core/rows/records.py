"""Row logic of package: release records with the published field names, and release metrics."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config.errors import SourceError
from stages.core.config.project import PROJECT, distribution_version
from stages.core.rows import fields
from stages.core.rows.requests import FAILED as FAILED_REQUEST
from stages.core.rows.requests import MODE_IGNORED, PARSED, PARTIAL, REFUSED, TOO_LONG, TRUNCATED
from stages.core.rows.responses import ANNOTATION, MESSAGE, SKIPPED_REDACTED
from stages.core.rows.scores import SCORE_FAILED
from stages.core.storage.jsonl import read_jsonl_gz


def messages(turns: pa.ChunkedArray, role: str, field: str = "content") -> pa.ChunkedArray:
    """list<struct> (responses) -> list<{role, content}>: each element's `field` under `role`; a null
    list stays null."""
    return pa.chunked_array([_messages(chunk, role, field) for chunk in turns.chunks], pa.list_(MESSAGE))


def _messages(turns: pa.ListArray, role: str, field: str) -> pa.ListArray:
    content = pc.struct_field(pc.list_flatten(turns), field)
    lengths = pc.fill_null(pc.list_value_length(turns), 0)
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())])
    values = pa.StructArray.from_arrays([pa.repeat(role, len(content)), content], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(offsets, values, pa.list_(MESSAGE), mask=turns.is_null())


def public_table(part: pa.Table, with_en: bool, with_second_turn: bool) -> pa.Table:
    """The public records of a batch of released rows (translation failures dropped): published field
    names, no Japanese instruction text, the types of public_schema."""
    columns = [
        part["conversation_id"],
        part[fields.DUPLICATE],
        part[fields.EMPTY],
        part[fields.TEMPLATE],
        messages(part["responses_ja"], "assistant"),
        part["annotations"],
    ]
    if with_en:
        columns.append(messages(part["responses_en"], "assistant"))
    if with_second_turn:
        columns.append(part["multiturn"])
    return pa.Table.from_arrays(columns, schema=public_schema(with_en, with_second_turn))


def instruction_table(part: pa.Table) -> pa.Table:
    """The records of the encrypted file: the Japanese first user turn of each released row."""
    turn = pa.table({"content": part["instruction_ja"]}).to_struct_array()  # one turn per row
    single = pa.chunked_array(
        [pa.ListArray.from_arrays(pa.array(range(len(c) + 1), pa.int32()), c) for c in turn.chunks],
        pa.list_(turn.type),
    )
    return pa.Table.from_arrays([part["conversation_id"], messages(single, "user")], schema=INSTRUCTIONS)


def public_schema(with_en: bool, with_second_turn: bool) -> pa.Schema:
    """Arrow schema of the public records: the one schema of the jsonl.gz and the Parquet file."""
    assistant_turns = pa.list_(MESSAGE)
    columns = [
        ("conversation_id", pa.string()),
        (fields.DUPLICATE, pa.string()),
        (fields.EMPTY, pa.bool_()),
        (fields.TEMPLATE, pa.string()),
        (fields.RESPONSES, assistant_turns),
        (fields.NOTES, pa.list_(ANNOTATION)),
    ]
    if with_en:
        columns.append((fields.RESPONSES_EN, assistant_turns))
    if with_second_turn:
        columns.append((fields.MULTITURN, CONVERSATIONS))
    return pa.schema(columns)


# synthesized_multiturn_conversation: a list of one conversation (our shape, docs/assumptions.md 32),
# starting at the best response: [[assistant, user, assistant]] (two-turn) or [[assistant]] (single-turn)
CONVERSATIONS = pa.list_(pa.list_(MESSAGE))
INSTRUCTIONS = pa.schema([("conversation_id", pa.string()), (fields.INSTRUCTION, pa.list_(MESSAGE))])
# Arrow types -> `datasets` dtypes (https://huggingface.co/docs/datasets/about_dataset_features)
DTYPES = {pa.string(): "string", pa.bool_(): "bool", pa.int64(): "int64", pa.float64(): "float64"}


def features(schema: pa.Schema) -> list[dict]:
    """The `dataset_info.features` of a dataset card (YAML) for `schema`, so that `load_dataset`
    gives the jsonl.gz the Parquet file's types, all-null columns included."""
    return [{"name": field.name, **_feature(field.type, field.name)} for field in schema]


def _feature(kind: pa.DataType, name: str) -> dict:
    if pa.types.is_list(kind):
        inner = _feature(kind.value_type, name)  # the card's short forms: `list: string`, `list: [fields]`
        return {"list": inner["dtype"] if "dtype" in inner else inner.get("struct", inner)}
    if pa.types.is_struct(kind):
        return {"struct": [{"name": f.name, **_feature(f.type, f"{name}.{f.name}")} for f in kind]}
    if kind not in DTYPES:
        raise ValueError(f"release field {name}: no dataset card type for Arrow type {kind}")
    return {"dtype": DTYPES[kind]}


def released(part: pa.Table) -> tuple[pa.Table, int]:
    """The rows of a batch that are released (a failed translation has no instruction), and how
    many are not."""
    failed = _count(part["translation_failed"])
    return (part.filter(pc.invert(part["translation_failed"])) if failed else part), failed


def add_metrics(totals: Counter, rows: pa.Table, failed: int) -> None:
    """Add a batch of released rows, and the count of failed translations, to the release counts."""
    scores = pc.struct_field(pc.list_flatten(rows["annotations"]), fields.SCORE)
    invalid = pc.equal(scores, SCORE_FAILED)
    totals.update(
        instructions=rows.num_rows,
        translation_failed=failed,
        instructions_with_responses=_count(pc.is_valid(rows["responses_ja"])),
        responses_ja=_sum(pc.list_value_length(rows["responses_ja"])),
        responses_en=_sum(pc.list_value_length(rows["responses_en"])),
        multiturn_conversations=_count(pc.greater(_turns(rows["multiturn"]), 1)),
        single_turn_conversations=_count(pc.equal(_turns(rows["multiturn"]), 1)),
        judgements=len(scores),
        judgements_failed=_count(invalid),
        template_instructions=_count(pc.is_valid(rows[fields.TEMPLATE])),
        empty_instructions=_count(rows[fields.EMPTY]),
        duplicate_instructions=_count(pc.is_valid(rows[fields.DUPLICATE])),
    )
    statuses = {
        "generate": pa.chunked_array([*rows["status_ja"].chunks, *rows["status_en"].chunks], pa.string()),
        "judge": pc.list_flatten(rows["judge_status"]),
        "second_turn": rows["multiturn_status"],
    }
    for stage, found in statuses.items():  # why requests have no answer (second turn: follow_up_failed...)
        totals[f"{stage}_skipped_too_long"] += _count(pc.ends_with(found, TOO_LONG))
        totals[f"{stage}_failed_requests"] += _count(pc.ends_with(found, FAILED_REQUEST))
        totals[f"{stage}_partial_requests"] += _count(pc.ends_with(found, PARTIAL))
        totals[f"{stage}_refused_requests"] += _count(pc.ends_with(found, REFUSED))  # final refusals
    # judgements scored by parsing their text: the server answered without the judge mode asked (asked
    # again next run), or honoured it but wrote no rating in it, or was cut at max_tokens (both final)
    totals["judge_mode_ignored"] += _count(pc.equal(statuses["judge"], MODE_IGNORED))
    totals["judge_parsed_from_text"] += _count(pc.equal(statuses["judge"], PARSED))
    totals["judge_truncated"] += _count(pc.equal(statuses["judge"], TRUNCATED))
    totals["generate_skipped_redacted"] += _count(pc.equal(rows["status_ja"], SKIPPED_REDACTED))
    totals["score_sum"] += pc.sum(pc.filter(scores, pc.invert(invalid))).as_py() or 0.0


def _count(flags: pa.ChunkedArray | pa.Array) -> int:
    """How many true values (nulls are not)."""
    return pc.sum(pc.cast(flags, pa.int64())).as_py() or 0


def _turns(entries: pa.ChunkedArray) -> pa.ChunkedArray:
    """The length of the (one) conversation of each non-null synthesized_multiturn_conversation."""
    return pc.list_value_length(pc.list_flatten(entries))


def _sum(values: pa.ChunkedArray | pa.Array) -> int:
    return pc.sum(values).as_py() or 0


def release_metrics(totals: Counter) -> dict:
    """The release's metrics from the running counts. Never a null: DVC cannot diff one, so without a
    parsed judgement there is no mean_preference_score (judgements_scored says 0)."""
    metrics = {k: v for k, v in totals.items() if k != "score_sum"}
    scored = totals["judgements"] - totals["judgements_failed"]
    metrics["judgements_scored"] = scored
    if scored:
        metrics["mean_preference_score"] = round(totals["score_sum"] / scored, 4)
    return metrics


def producers(engines: dict[str, dict]) -> dict:
    """What produced a release: this project's version, and per role (translate, generate, judge,
    second_turn) the model, its revision and placement, and the engine with its library versions; a
    service without a model (DeepL) is named by its backend, with null model and revision."""
    models = {}
    for role, engine in sorted(engines.items()):
        llm = engine.get("llm") or {}
        models[role] = {
            "model": llm.get("model"),
            "revision": llm.get("revision"),
            "dtype": llm.get("dtype"),
            "quantization": llm.get("quantization"),
            "engine": engine["backend"],
            "libraries": engine["libraries"],
        }
    return {"project": {"name": PROJECT, "version": distribution_version(PROJECT)}, "models": models}


def instruction_rows(path: str | os.PathLike) -> Iterator[dict]:
    """conversation_id and instruction_ja of each record of a decrypted instructions file (the
    plaintext of lmsys-chat-1m-first-turn-user-instructions-<subset>.jsonl.gz.gpg), in its order. A
    record without its id or first user turn, or one that repeats an id, is an error naming it."""
    seen = set()  # conversation_ids so far: ~0.5 M of them in the published release
    for i, record in enumerate(read_jsonl_gz(path), 1):
        turns = record.get(fields.INSTRUCTION) or []
        if "conversation_id" not in record or not turns or turns[0].get("role") != "user":
            raise SourceError(
                f"{path}: record {i} lacks conversation_id or a first user turn in {fields.INSTRUCTION} "
                "(pass the decrypted instructions file: .jsonl.gz, not the .gpg)"
            )
        if record["conversation_id"] in seen:
            raise SourceError(f"{path}: record {i} repeats conversation_id {record['conversation_id']}")
        seen.add(record["conversation_id"])
        yield {"conversation_id": record["conversation_id"], "instruction_ja": turns[0]["content"]}
