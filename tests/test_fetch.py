"""fetch: sources (local, S3, the Hub's access errors), checksums, filter rules, source hygiene
(duplicate ids, long first turns, unreadable shards), clean failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.config.errors import SourceError
from stages.core.config.source_params import FilterSpec
from stages.core.rows.first_turn import SeenIds, filter_batch
from stages.core.storage.source import AccessError, ChecksumError
from tests.conftest import ROOT, run_stage, set_params
from tests.hub_server import HubServer
from tests.s3 import CREDENTIALS, moto_server, upload_tree

OUTPUTS = [
    "data/raw/lmsys-chat-1m",
    "data/raw/released",
    "data/raw/manifest.json",
    "data/interim/first-turn.parquet",
]
REVISION = "200748d9d3cddcc9d782887541057aca0b18c5da"
LONG_RELEASED_CHARS = 200_000  # the sample's long first turn whose translation is released
LONG_MISSING_CHARS = 60_000  # the one the release lacks


def _outputs(workspace: Path) -> dict[str, bytes]:
    """Every file fetch wrote, by path, with its bytes."""
    found = {}
    for name in OUTPUTS:
        path = workspace / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found[file.relative_to(workspace).as_posix()] = file.read_bytes()
    return found


def _assert_no_output(workspace: Path) -> None:
    assert not any((workspace / name).exists() for name in OUTPUTS)
    leftovers = [
        p.name for p in (workspace / "data").rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")
    ]
    assert leftovers == []


def _shard(workspace: Path, number: int) -> Path:
    return next((workspace / "data/sample/lmsys-chat-1m/data").glob(f"train-{number:05d}-*.parquet"))


def test_fetch_filters_the_sample(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    metrics = json.loads((workspace / "data/metrics/fetch.json").read_text())
    rows = metrics["rows"]
    assert rows["rows_in"] == 339
    assert rows["rows_in"] - rows["rows_out"] == sum(v for k, v in rows.items() if k.startswith("dropped_"))
    assert rows["dropped_language"] == 12 and rows["flagged"] == 12  # flagged: kept for ja+unsafe
    assert rows["dropped_duplicate_id"] == 1 and rows["dropped_first_message_not_user"] == 0
    assert rows["dropped_null_id"] == 0
    assert rows["long_first_turn"] == 2 and metrics["max_instruction_chars"] == LONG_RELEASED_CHARS
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert len(table) == rows["rows_out"] == 326 and table.flagged.sum() == 12
    assert table.conversation_id.is_unique
    assert set(table.language) == {"English", "Japanese"}
    assert table.flagged.sum() == 12
    assert table.redacted.sum() == 12  # redacted conversations are kept (redacted: keep)
    assert (table.instruction == "").sum() == rows["empty_first_turn"] == 4  # kept, not silently dropped
    assert table.empty_first_turn.sum() == 4 and (table[table.empty_first_turn].instruction == "").all()


def test_a_repeated_conversation_id_is_kept_once_as_first_seen(workspace, monkeypatch):
    first, second = (pq.read_table(_shard(workspace, n)).to_pylist() for n in (0, 1))
    repeated = {r["conversation_id"] for r in first} & {r["conversation_id"] for r in second}
    assert len(repeated) == 1
    (cid,) = repeated
    (original,) = (r["conversation"][0]["content"] for r in first if r["conversation_id"] == cid)
    (copy,) = (r["conversation"][0]["content"] for r in second if r["conversation_id"] == cid)
    assert original != copy
    run_stage(monkeypatch, "fetch")
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert rows["dropped_duplicate_id"] == 1
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert table[table.conversation_id == cid].instruction.tolist() == [original]


def test_duplicates_within_a_batch_and_after_a_dropped_row():
    def row(cid: str, language: str, text: str) -> dict:
        return {
            "conversation_id": cid, "model": "m", "conversation": [{"content": text, "role": "user"}],
            "turn": 1, "language": language, "openai_moderation": [{"flagged": False}], "redacted": False,
        }  # fmt: skip

    rows = [row("a", "German", "eins"), row("a", "English", "one"), row("a", "English", "two")]
    rows += [row("b", "English", "three"), row("b", "English", "four")]
    spec = FilterSpec(languages=["English"], redacted="keep", long_first_turn_chars=3)
    counts, seen = Counter(), SeenIds()
    table = filter_batch(pa.RecordBatch.from_pylist(rows), spec, counts, seen)
    assert table.column("instruction").to_pylist() == ["one", "three"]  # German "a" is no duplicate
    assert counts["dropped_language"] == 1 and counts["dropped_duplicate_id"] == 2
    assert table.column("long_first_turn").to_pylist() == [False, True]
    again = filter_batch(pa.RecordBatch.from_pylist(rows[3:]), spec, counts, seen)
    assert again.num_rows == 0 and counts["dropped_duplicate_id"] == 4  # ids seen in an earlier batch


def test_rows_without_a_conversation_id_are_dropped_and_counted(workspace, monkeypatch):
    shard = _shard(workspace, 1)
    table = pq.read_table(shard)
    elsewhere = set(
        pq.read_table(_shard(workspace, 0), columns=["conversation_id"])["conversation_id"].to_pylist()
    )
    kept = [
        i
        for i, row in enumerate(table.select(["conversation_id", "language", "conversation"]).to_pylist())
        if row["language"] in ("English", "Japanese")
        and row["conversation"][0]["role"] == "user"
        and row["conversation_id"] not in elsewhere
    ][:3]  # rows fetch keeps: three, so that the first is neither kept nor the others duplicates
    ids = table["conversation_id"].to_pylist()
    ids = [None if i in kept else cid for i, cid in enumerate(ids)]
    pq.write_table(table.set_column(0, "conversation_id", pa.array(ids, pa.string())), shard)
    run_stage(monkeypatch, "fetch")
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert rows["dropped_null_id"] == 3 and rows["rows_out"] == 326 - 3
    assert rows["dropped_duplicate_id"] == 1 and rows["dropped_language"] == 12
    assert rows["rows_in"] - rows["rows_out"] == sum(v for k, v in rows.items() if k.startswith("dropped_"))
    out = pq.read_table(workspace / "data/interim/first-turn.parquet")
    assert out.num_rows == 323 and out["conversation_id"].null_count == 0


def test_a_null_empty_or_blank_id_is_dropped_first_and_never_a_duplicate():
    def row(cid: str | None, language: str) -> dict:
        return {
            "conversation_id": cid, "model": "m", "conversation": [{"content": "hi", "role": "user"}],
            "turn": 1, "language": language, "openai_moderation": [{"flagged": False}], "redacted": False,
        }  # fmt: skip

    rows = [row(None, "English"), row("", "English"), row(" \t", "German"), row("a", "English")]
    spec = FilterSpec(languages=["English"], redacted="keep", long_first_turn_chars=100)
    counts = Counter()
    table = filter_batch(pa.RecordBatch.from_pylist(rows), spec, counts, SeenIds())
    assert table.column("conversation_id").to_pylist() == ["a"]
    assert counts["dropped_null_id"] == 3 and counts["dropped_language"] == 0
    assert counts["dropped_duplicate_id"] == 0


def test_long_first_turns_are_kept_and_flagged(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert (table.instruction_chars == table.instruction.str.len()).all()
    assert (table[table.empty_first_turn].instruction_chars == 0).all()
    longest = table[table.instruction_chars == LONG_RELEASED_CHARS]
    assert len(longest) == 1 and longest.long_first_turn.item() and longest.language.item() == "English"
    assert sorted(table[table.long_first_turn].instruction_chars) == [LONG_MISSING_CHARS, LONG_RELEASED_CHARS]
    assert table.instruction_chars.dtype == "int64" and table.long_first_turn.dtype == bool


def _truncate(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _not_parquet(shard: Path) -> None:
    shard.write_text("conversation_id,model,language\nx,vicuna-13b,English\n", encoding="utf-8")


def _corrupt_a_page_header(shard: Path) -> None:
    """Overwrite a data page header of the second row group: opening works, reading it fails."""
    chunk = pq.ParquetFile(shard).metadata.row_group(1).column(2)
    data = bytearray(shard.read_bytes())
    start = chunk.data_page_offset + 40
    data[start : start + 200] = bytes(b ^ 0xFF for b in data[start : start + 200])
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _not_parquet, _corrupt_a_page_header])
def test_an_unreadable_shard_is_named_and_leaves_nothing(workspace, monkeypatch, damage):
    shard = _shard(workspace, 1)
    damage(shard)
    named = rf"data/sample/lmsys-chat-1m/data/{shard.name}: not a readable Parquet file \(.+\); "
    with pytest.raises(SourceError, match=named + r".*re-fetch it .*fetch\.source"):
        run_stage(monkeypatch, "fetch")
    _assert_no_output(workspace)


def test_an_unreadable_shard_exits_2_with_a_plain_message(workspace):
    shard = _shard(workspace, 1)
    _truncate(shard)
    env = {k: v for k, v in os.environ.items() if k != "LMSYS_SYNTH_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "stages.fetch"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert shard.name in done.stderr and "not a readable Parquet file" in done.stderr
    assert "Traceback" not in done.stderr
    _assert_no_output(workspace)


def test_manifest_lists_every_file_with_size_and_sha256(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    manifest = json.loads((workspace / "data/raw/manifest.json").read_text())
    assert manifest["source"]["uri"] == "data/sample/lmsys-chat-1m"
    listed = {f["path"]: f for f in manifest["source"]["files"]}
    on_disk = sorted(
        p.relative_to(workspace / "data/sample/lmsys-chat-1m").as_posix()
        for p in (workspace / "data/sample/lmsys-chat-1m").rglob("*.parquet")
    )
    assert sorted(listed) == on_disk
    for name, entry in listed.items():
        data = (workspace / "data/raw/lmsys-chat-1m" / name).read_bytes()
        assert entry == {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # the two encrypted subsets, the key script, the judge prompt and 4 licence placeholders
    assert len(manifest["released"]["files"]) == 8


def test_pinned_checksums_pass(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    pins = {
        f["path"]: f["sha256"]
        for f in json.loads((workspace / "data/raw/manifest.json").read_text())["source"]["files"]
    }
    set_params(workspace, lambda d: d["fetch"]["source"].update(sha256=pins))
    run_stage(monkeypatch, "fetch")


def test_flagged_conversations_are_kept_and_redacted_ones_dropped_on_request(workspace, monkeypatch):
    set_params(workspace, lambda d: d["fetch"]["filter"].update(redacted="drop"))
    run_stage(monkeypatch, "fetch")
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert "dropped_moderation" not in rows and rows["flagged"] == 12 and rows["dropped_redacted"] == 12
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert table.flagged.sum() == 12 and not table.redacted.any()


def test_reruns_are_byte_identical(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    first = _outputs(workspace) | {"fetch.json": (workspace / "data/metrics/fetch.json").read_bytes()}
    run_stage(monkeypatch, "fetch")
    assert _outputs(workspace) | {"fetch.json": (workspace / "data/metrics/fetch.json").read_bytes()} == first


def test_local_directory_and_s3_give_identical_outputs(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    local = _outputs(workspace)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with moto_server() as endpoint:
        upload_tree(endpoint, "lmsys", "lmsys-chat-1m", workspace / "data/sample/lmsys-chat-1m")
        upload_tree(endpoint, "synth", "lmsys-chat-1m-synth", workspace / "data/sample/lmsys-chat-1m-synth")
        for key, uri in (
            ("source", "s3://lmsys/lmsys-chat-1m"),
            ("released", "s3://synth/lmsys-chat-1m-synth"),
        ):
            options = {"endpoint_url": endpoint}
            set_params(
                workspace, lambda d, k=key, u=uri, o=options: d["fetch"][k].update(uri=u, storage_options=o)
            )
        shutil.rmtree(workspace / "data/raw")
        run_stage(monkeypatch, "fetch")
    from_s3 = _outputs(workspace)
    manifest = json.loads(from_s3.pop("data/raw/manifest.json"))
    local_manifest = json.loads(local.pop("data/raw/manifest.json"))
    assert from_s3 == local
    assert manifest["source"]["uri"] == "s3://lmsys/lmsys-chat-1m"
    assert manifest["source"]["files"] == local_manifest["source"]["files"]


def test_checksum_mismatch_names_file_and_hashes_and_leaves_nothing(workspace, monkeypatch):
    name = next((workspace / "data/sample/lmsys-chat-1m/data").glob("train-00001*")).name
    set_params(workspace, lambda d: d["fetch"]["source"]["sha256"].update({f"data/{name}": "0" * 64}))
    with pytest.raises(ChecksumError, match=rf"data/{name}: sha256 is [0-9a-f]{{64}} but params pin 0{{64}}"):
        run_stage(monkeypatch, "fetch")
    _assert_no_output(workspace)


def test_a_failed_fetch_keeps_the_previous_outputs_untouched(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    before = _outputs(workspace)
    set_params(workspace, lambda d: d["fetch"]["released"].update(include=["dataset/nothing-*.gpg"]))
    with pytest.raises(SourceError, match="no file under data/sample/lmsys-chat-1m-synth matches"):
        run_stage(monkeypatch, "fetch")
    assert _outputs(workspace) == before


def _set(table: pa.Table, name: str, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def _set_item_field(table: pa.Table, name: str, field: str, change) -> pa.Table:
    """`table` with `field` of column `name`'s list items replaced by change(field's values)."""
    lists = table[name].combine_chunks()
    items = lists.values
    names = [f.name for f in items.type]
    children = [change(items.field(i)) if n == field else items.field(i) for i, n in enumerate(names)]
    return _set(
        table, name, pa.ListArray.from_arrays(lists.offsets, pa.StructArray.from_arrays(children, names))
    )


def _cast(name: str, to: pa.DataType):
    return lambda t: _set(t, name, t[name].cast(to))


def _in_items(name: str, field: str, change):
    return lambda t: _set_item_field(t, name, field, change)


def _wrap(a: pa.Array) -> pa.StructArray:
    return pa.StructArray.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a], ["x"])


# a source shard's schema made wrong -> what the message says after the file's name
BAD_SCHEMAS = {
    "missing column": (
        lambda t: t.drop_columns(["redacted"]),
        r"missing LMSYS-Chat-1M columns \['redacted'\]",
    ),
    "string for an integer": (_cast("turn", pa.string()), r"column 'turn' is string, expected integer"),
    "int8 for a bool": (_cast("redacted", pa.int8()), r"column 'redacted' is int8, expected bool"),
    "string for a bool": (_cast("redacted", pa.string()), r"column 'redacted' is string, expected bool"),
    "struct for a string": (
        lambda t: _set(t, "model", _wrap(t["model"])),
        r"column 'model' is struct<x: string>, expected string",
    ),
    "string for a list": (
        lambda t: _set(t, "conversation", t["conversation_id"]),
        r"column 'conversation' is string, expected a list of structs with content: string, role: string",
    ),
    "struct for a string in items": (
        _in_items("conversation", "content", _wrap),
        r"field 'content' of column 'conversation' is struct<x: string>, expected string",
    ),
    "integer for a string in items": (
        _in_items("conversation", "role", pc.utf8_length),
        r"field 'role' of column 'conversation' is int32, expected string",
    ),
    "string for a bool in items": (
        _in_items("openai_moderation", "flagged", lambda a: a.cast(pa.string())),
        r"field 'flagged' of column 'openai_moderation' is string, expected bool",
    ),
}


@pytest.mark.parametrize("case", BAD_SCHEMAS)
def test_bad_shard_schema_is_named_and_leaves_nothing(workspace, monkeypatch, case):
    change, message = BAD_SCHEMAS[case]
    shard = _shard(workspace, 1)
    pq.write_table(change(pq.read_table(shard)), shard)
    with pytest.raises(SourceError, match=rf"lmsys-chat-1m/data/{shard.name}: {message}; .*fetch\.source"):
        run_stage(monkeypatch, "fetch")
    _assert_no_output(workspace)


def test_a_directory_named_like_a_shard_is_named_and_leaves_nothing(workspace, monkeypatch):
    shard = _shard(workspace, 1)
    data = shard.read_bytes()
    shard.unlink()
    (shard / "part-0.parquet").parent.mkdir()
    (shard / "part-0.parquet").write_bytes(data)
    message = (
        f"data/sample/lmsys-chat-1m/data/{shard.name} is a directory, where ['data/train-*.parquet'] should "
        "match files only: remove or rename it, or narrow the include globs in conf/source/"
    )
    with pytest.raises(SourceError) as err:
        run_stage(monkeypatch, "fetch")
    assert str(err.value) == message
    _assert_no_output(workspace)


def _use_hub(workspace: Path, endpoint: str | None = None) -> None:
    options = {"endpoint": endpoint} if endpoint else {}
    set_params(
        workspace,
        lambda d: d["fetch"]["source"].update(
            uri="hf://datasets/lmsys/lmsys-chat-1m", revision=REVISION, storage_options=options
        ),
    )


def test_missing_token_explains_how_to_get_access(workspace, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(workspace / "hf-home"))  # no token saved by `hf auth login`
    _use_hub(workspace)
    with pytest.raises(AccessError) as err:
        run_stage(monkeypatch, "fetch")
    assert str(err.value) == (
        "hf://datasets/lmsys/lmsys-chat-1m: no Hugging Face token (HF_TOKEN is not set). "
        "Accept the dataset's license at https://huggingface.co/datasets/lmsys/lmsys-chat-1m, "
        "create a read token at https://huggingface.co/settings/tokens and export HF_TOKEN=<token>"
    )
    _assert_no_output(workspace)


class _GatedHub(BaseHTTPRequestHandler):
    """Answers every request as the Hub does for a gated repository whose license is not accepted."""

    def _deny(self) -> None:
        body = b'{"error": "Access to dataset lmsys/lmsys-chat-1m is restricted."}'
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _deny

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gated_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_token_without_access_explains_the_license(workspace, monkeypatch, gated_hub):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the "Hub" is on 127.0.0.1
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    _use_hub(workspace, gated_hub)
    with pytest.raises(
        AccessError, match=r"lmsys-chat-1m: no access with this token\. Accept the dataset's license"
    ):
        run_stage(monkeypatch, "fetch")
    _assert_no_output(workspace)


def test_release_config_refuses_a_branch_revision():
    from stages.core.config.compose import compose_params

    with pytest.raises(
        ValueError, match=r"fetch\.source\.revision='main': a release config must pin a 40-hex commit"
    ):
        compose_params(["fetch.source.revision=main"])


IDS = st.one_of(st.sampled_from(["", "a", "a\x00", "\x00", "ab", "長いＩＤ" * 9]), st.text(max_size=6))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(IDS, max_size=12), max_size=8))
def test_kept_ids_drop_what_a_set_of_the_ids_would(batches):
    """fetch's compact store of the ids kept so far answers as a Python set of them: an id seen in
    an earlier batch or earlier in its own is dropped, whatever its length or NULs (a null id never
    reaches it: the null_id rule drops the row first)."""
    seen, kept = SeenIds(), set()
    for batch in batches:
        expected = []
        for cid in batch:
            expected.append(cid in kept)
            kept.add(cid)
        assert seen.drop(pa.array(batch, pa.string())).tolist() == expected
    assert len(seen) == len(kept)


def test_a_rerun_fetch_downloads_no_pinned_file_it_already_has(workspace, monkeypatch, caplog):
    """Files whose bytes params fix (sha256 pins; a Hub commit likewise) are kept once under
    paths.fetched: a re-run of fetch (DVC deleted its outs first) links them from there and reads
    nothing of the source but its listing. Here every source file is then overwritten with other
    bytes of the same size: the re-run still gives the same outputs, so it read none of them."""
    sources = sorted((workspace / "data/sample/lmsys-chat-1m").rglob("*.parquet"))
    pins = {p.relative_to(workspace / "data/sample/lmsys-chat-1m").as_posix(): sha256_of(p) for p in sources}
    set_params(workspace, lambda d: d["fetch"]["source"].update(sha256=pins))
    run_stage(monkeypatch, "fetch")
    first = (workspace / "data/interim/first-turn.parquet").read_bytes()
    shutil.rmtree(workspace / "data/raw")  # as `dvc repro` removes a stage's outs before it runs
    for path in sources:
        path.write_bytes(b"\0" * path.stat().st_size)
    caplog.set_level("INFO")
    run_stage(monkeypatch, "fetch")
    assert (workspace / "data/interim/first-turn.parquet").read_bytes() == first
    assert f"{len(sources)} of {len(sources)} files reused" in caplog.text
    assert "fetched data/" not in caplog.text  # no source file was downloaded


def test_an_unpinned_local_file_is_read_again_on_every_fetch(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    shard = _shard(workspace, 1)
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 10), shard)  # a local source may change: it is read again
    run_stage(monkeypatch, "fetch")
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert rows["rows_in"] < 326


HUB_TOKEN = "hf_" + "fetchcanary" * 3  # sent only to the stand-in on 127.0.0.1
# fetch's two sources -> the Hub dataset that serves it and the sample directory laid out like it
SAMPLE_REPOS = {
    "source": ("lmsys/lmsys-chat-1m", "data/sample/lmsys-chat-1m"),
    "released": ("tokyotech-llm/lmsys-chat-1m-synth", "data/sample/lmsys-chat-1m-synth"),
}


@pytest.fixture
def hub(monkeypatch) -> Iterator[HubServer]:
    """The Hub stand-in on 127.0.0.1 (tests/hub_server.py) and a token for it; stopped when the test ends."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the "Hub" is on 127.0.0.1
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    with HubServer(HUB_TOKEN) as server:
        yield server


def _serve_sample(workspace: Path, hub: HubServer, branch: bool = False) -> set[tuple[str, str, str]]:
    """Push the sample's two sources to `hub`, each as one commit, and point fetch at them (their
    storage_options.endpoint) at that commit, or at `main` with `branch`. Returns the files served, as
    (repo id, revision, path), the names that `hub.downloads()` gives."""
    served = set()
    for key, (repo, local) in SAMPLE_REPOS.items():
        root = workspace / local
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        commit = hub.push(repo, files)
        revision = "main" if branch else commit
        options = {"endpoint": hub.url}
        set_params(
            workspace,
            lambda d, k=key, u=f"hf://datasets/{repo}", r=revision, o=options: d["fetch"][k].update(
                uri=u, revision=r, storage_options=o
            ),
        )
        served |= {(repo, revision, name) for name in files}
    return served


def _taken(workspace: Path) -> set[tuple[str, str, str]]:
    """The Hub files that the manifest lists, as (repo id, revision, path)."""
    manifest = json.loads((workspace / "data/raw/manifest.json").read_text())
    return {
        (manifest[key]["uri"].removeprefix("hf://datasets/"), manifest[key]["revision"], item["path"])
        for key in SAMPLE_REPOS
        for item in manifest[key]["files"]
    }


def _remove_outputs(workspace: Path) -> None:
    """As `dvc repro` removes a stage's outs before it runs it."""
    for name in OUTPUTS:
        path = workspace / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _with_metrics(workspace: Path) -> dict[str, bytes]:
    return _outputs(workspace) | {"fetch.json": (workspace / "data/metrics/fetch.json").read_bytes()}


def test_a_rerun_fetch_from_the_hub_downloads_no_file_of_a_commit_it_has(workspace, monkeypatch, caplog, hub):
    """The sample's sources on a Hub (the stand-in, counting requests) at commit revisions: the first
    fetch downloads each file it takes into the outputs that the sample's directories give; a re-run
    sends no download request (nor a HEAD) and links every file from paths.fetched, into byte-identical
    outputs. Its only requests list the repositories (repo info, tree), which is allowed."""
    run_stage(monkeypatch, "fetch")  # from the sample's directories
    local = _outputs(workspace)
    served = _serve_sample(workspace, hub)
    _remove_outputs(workspace)
    run_stage(monkeypatch, "fetch")
    first = _with_metrics(workspace)
    taken = _taken(workspace)
    assert len(taken) == 10 and taken <= served  # 2 shards; 2 subsets, the key script, 5 pinned files
    assert sorted(hub.downloads()) == sorted(taken)  # each file once
    manifest, local_manifest = (json.loads(o.pop("data/raw/manifest.json")) for o in (dict(first), local))
    assert {k: v for k, v in first.items() if k not in ("data/raw/manifest.json", "fetch.json")} == local
    assert all(manifest[key]["files"] == local_manifest[key]["files"] for key in SAMPLE_REPOS)
    assert manifest["source"]["revision"] == hub.repos["lmsys/lmsys-chat-1m"].commits[-1]["oid"]

    _remove_outputs(workspace)
    before = len(hub.requests)
    caplog.set_level("INFO")
    run_stage(monkeypatch, "fetch")
    again = hub.requests[before:]
    assert [path for _, path in again if "/resolve/" in path] == []  # no file's bytes nor its metadata
    assert {urlsplit(path).path.split("/")[5] for _, path in again} <= {"revision", "tree"}  # listings
    assert _with_metrics(workspace) == first
    assert "hf://datasets/lmsys/lmsys-chat-1m: 2 of 2 files reused" in caplog.text
    assert "hf://datasets/tokyotech-llm/lmsys-chat-1m-synth: 8 of 8 files reused" in caplog.text
    assert " fetched " not in caplog.text


def test_a_rerun_fetch_from_a_hub_branch_downloads_its_unpinned_files_again(
    workspace, monkeypatch, caplog, hub
):
    """At a branch (`main`) a file's bytes may change between runs: a re-run downloads every file that no
    sha256 pins again, and so reads a shard that a new commit changed; it reuses only the pinned files."""
    served = _serve_sample(workspace, hub, branch=True)
    run_stage(monkeypatch, "fetch")
    taken = _taken(workspace)
    assert taken <= served and sorted(set(hub.downloads())) == sorted(taken)
    shard = _shard(workspace, 1)
    changed = pa.BufferOutputStream()
    pq.write_table(pq.read_table(shard).slice(0, 10), changed)
    hub.push("lmsys/lmsys-chat-1m", {f"data/{shard.name}": changed.getvalue().to_pybytes()})
    pins = yaml.safe_load((workspace / "params.yaml").read_text())["fetch"]["released"]["sha256"]
    pinned = {("tokyotech-llm/lmsys-chat-1m-synth", "main", name) for name in pins}
    assert len(pinned) == 5 and pinned <= taken
    _remove_outputs(workspace)
    before = len(hub.downloads())
    caplog.set_level("INFO")
    run_stage(monkeypatch, "fetch")
    assert sorted(hub.downloads()[before:]) == sorted(taken - pinned)
    assert "hf://datasets/tokyotech-llm/lmsys-chat-1m-synth: 5 of 8 files reused" in caplog.text
    assert "hf://datasets/lmsys/lmsys-chat-1m: " not in caplog.text  # no shard reused
    fetched = workspace / "data/raw/lmsys-chat-1m/data" / shard.name
    assert fetched.read_bytes() == changed.getvalue().to_pybytes()
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert rows["rows_in"] < 339  # the new commit's shard was read


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
