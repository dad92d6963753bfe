"""The licence guard's content check (stages/core/release/leaks.py) and its OpenPGP packet check
(stages/core/release/openpgp.py): a private instruction is found in any value, at any depth, however
it is spaced, cased or cut down to 47 characters, and in raw bytes no reader shows; ordinary text that
shares short phrases with the instructions is not; a .gpg file must be encrypted data, not `gpg --store`."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.release import leaks, openpgp
from stages.core.storage.crypto import encrypt_file

# instructions as LMSYS users write them (Japanese translations), long and short
LONG = (
    "ノルウェーのベルゲンにある化学会社、Nordfjell Kjemi ASについて200語以上の紹介文を書いてください。"
    "会社の歴史、主な製品、そして地域社会への貢献についても触れてください。"
)
TEMPLATE = "次の文章を英語に翻訳してください：今日はとても良い天気なので、公園まで散歩に行きました。"
SHORT = "日本の首都はどこですか？"  # 12 characters: found only as a whole value
GREETING = "こんにちは"  # 5: a common phrase, never checked
# ordinary responses that share phrases (under 32 characters) with the instructions
ORDINARY = [
    "Nordfjell Kjemi ASはノルウェーのベルゲンにある化学会社です。以下に紹介文を書きます。",
    "こんにちは！今日はとても良い天気ですね。何かお手伝いできることはありますか？",
    "日本の首都は東京です。東京は日本の政治、経済、文化の中心地です。",
    "200語以上の紹介文を書いてください、というご依頼ですね。会社の歴史から始めます。",
    "Today the weather is very nice, so I went for a walk to the park.",
]


@pytest.fixture(scope="module")
def private() -> leaks.PrivateText:
    return leaks.PrivateText.of([[LONG, TEMPLATE, SHORT, GREETING]])


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@pytest.mark.parametrize(
    "copy",
    [
        LONG,
        f"回答: {LONG} 以上です。",
        " ".join(LONG),
        "\u200b".join(LONG),
        LONG.replace("、", "、\n\n"),
        LONG.upper(),
        _fullwidth(LONG),
        LONG[:47],
        LONG[20:67],
        LONG[-47:],
        f"前置き{TEMPLATE[5:52]}後書き",
        SHORT,
        f" {SHORT}\n",
    ],
    ids=[
        "whole",
        "inside a sentence",
        "spaced",
        "zero-width joined",
        "newlines",
        "upper case",
        "fullwidth",
        "first 47",
        "middle 47",
        "last 47",
        "47 of another",
        "short whole",
        "short whole spaced",
    ],
)
def test_a_copy_is_found_however_it_is_spaced_cased_or_cut(private, copy):
    assert private.hits(["関係のない文章です。", copy]) == {1}


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_that_shares_short_phrases_is_not_a_leak(private, text):
    assert private.hits([text]) == set()


def test_a_short_instruction_inside_a_longer_text_and_a_common_phrase_are_not_leaks(private):
    assert private.hits([f"ご質問「{SHORT}」にお答えします。", GREETING, LONG[:30]]) == set()
    assert private.instructions == 3  # the greeting is not indexed


def _parquet(tmp_path: Path, table: pa.Table) -> Path:
    pq.write_table(table, tmp_path / "x.parquet")
    return tmp_path / "x.parquet"


TURNS = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@pytest.mark.parametrize(
    ("column", "where"),
    [
        (pa.array(["a", LONG]), "notes, row 1"),
        (
            pa.array([[{"role": "assistant", "content": f"はい。{LONG}"}], None], TURNS),
            "notes[].content, row 0",
        ),
        (pa.array([None, [[TEMPLATE]]], pa.list_(pa.list_(pa.string()))), "notes[][], row 1"),
        (pa.array([[(LONG, "v")], []], pa.map_(pa.string(), pa.string())), "notes[].key, row 0"),
        (pa.array(["x", SHORT]).dictionary_encode(), "notes (dictionary); notes, row 1"),
        (pa.DictionaryArray.from_arrays(pa.array([0, 0], pa.int32()), ["x", LONG]), "notes (dictionary)"),
        (pa.array([b"", LONG.encode()], pa.large_binary()), "notes, row 1"),
        (pa.array([{"a": {"b": LONG}}, None]), "notes.a.b, row 0"),
    ],
    ids=[
        "string",
        "list of structs",
        "list of lists",
        "map key",
        "dictionary",
        "unused dictionary entry",
        "binary",
        "struct",
    ],
)
def test_every_value_of_a_parquet_file_is_read_with_its_column_path_and_row(private, tmp_path, column, where):
    found = leaks.scan(_parquet(tmp_path, pa.table({"id": ["1", "2"], "notes": column})), private)
    assert found.leaks == f"holds private instruction text (LMSYS-Chat-1M licence) in {where}"
    assert "notes" in found.paths and "id" in found.paths


def test_field_names_and_metadata_are_read_and_not_quoted(private, tmp_path):
    table = pa.table({LONG: ["x"]}).replace_schema_metadata({"note": TEMPLATE})
    found = leaks.scan(_parquet(tmp_path, table), private)
    assert (
        found.leaks == "holds private instruction text (LMSYS-Chat-1M licence) in <field names>; <metadata>"
    )
    assert found.paths == {"<a name>"}


def test_a_parquet_file_s_nested_paths_are_all_named(private, tmp_path):
    table = pa.table({"r": pa.array([[{"role": "a", "content": "b"}]], TURNS)})
    assert leaks.scan(_parquet(tmp_path, table), private).paths == {"r", "r[]", "r[].role", "r[].content"}


def _jsonl_gz(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return path


def test_json_lines_values_and_keys_are_read_at_any_depth(private, tmp_path):
    lines = [json.dumps({"a": [{"b": "x"}]}), json.dumps({"a": [{"b": f"…{LONG}…"}], "c": {SHORT: 1}})]
    found = leaks.scan(_jsonl_gz(tmp_path, lines), private)
    assert found.leaks == "holds private instruction text (LMSYS-Chat-1M licence) in a[].b, row 1; c{}, row 1"
    assert found.paths == {"a", "a[].b", "c", "c.<a name>"}


def test_a_key_held_twice_is_refused_a_reader_would_show_one_value(private, tmp_path):
    path = _jsonl_gz(tmp_path, ['{"a": "x"}', f'{{"a": "{LONG}", "a": null}}'])
    assert (
        "row 1 is not JSON as package writes it (an object holds key a twice"
        in leaks.scan(path, private).leaks
    )


def test_raw_bytes_no_reader_shows_are_read(private, tmp_path):
    """A gzip header's comment (FCOMMENT) that every gzip reader skips."""
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = b'{"a": "x"}\n'
    header = b"\x1f\x8b\x08\x10" + struct.pack("<I", 0) + b"\x00\xff" + LONG.encode() + b"\x00"
    trailer = struct.pack("<II", zlib.crc32(data), len(data))
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(header + body.compress(data) + body.flush() + trailer)
    assert gzip.decompress(path.read_bytes()) == data  # a reader sees only the record
    assert (
        leaks.scan(path, private).leaks
        == "holds private instruction text (LMSYS-Chat-1M licence) in <raw bytes>, byte 10"
    )


def test_a_text_longer_than_a_piece_is_read_across_its_slices(private):
    filler = "あ" * (leaks.PIECE - 20)
    assert private.hits([filler + LONG + filler, filler * 3]) == {0}


# OpenPGP: encrypted data or not


def _new_length(body: bytes) -> bytes:
    return bytes([len(body)]) + body if len(body) < 192 else b"\xff" + len(body).to_bytes(4, "big") + body


def _partial(tag: int, body: bytes) -> bytes:
    """A new-format packet in partial lengths of 512 bytes (as gpg streams), then the rest."""
    out, rest = bytes([0xC0 | tag]), body
    while len(rest) > 512:
        out, rest = out + b"\xe9" + rest[:512], rest[512:]
    return out + _new_length(rest)


SKESK = bytes([4, 9, 3, 10]) + b"saltsalt" + b"\xff"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x8c" + bytes([len(SKESK)]) + SKESK + _partial(18, b"\x01" + b"c" * 2000), None),
        (bytes([0x80 | 3 << 2]) + bytes([len(SKESK)]) + SKESK + bytes([0x80 | 9 << 2 | 3]) + b"c" * 99, None),
        (
            b"\xc1"
            + _new_length(b"k" * 300)
            + b"\xc3"
            + _new_length(SKESK)
            + b"\xd4"
            + _new_length(b"a" * 50),
            None,
        ),
        (
            b"\xcb" + _new_length(b"b\x00\x00\x00\x00\x00plain"),
            "first OpenPGP packet is literal data (tag 11)",
        ),
        (b"\xa3\x01" + b"x" * 40, "first OpenPGP packet is compressed data (tag 8)"),
        (b"\xc3" + _new_length(SKESK) + b"\xcb" + _new_length(b"plain"), "followed by literal data (tag 11)"),
        (b"\xc3" + _new_length(SKESK), "followed by nothing"),
        (
            b"\xc3" + _new_length(SKESK) + b"\xd2" + _new_length(b"c" * 9) + b"\xcb\x01x",
            "after its encrypted data",
        ),
        (b"\xc3" + _new_length(SKESK) + b"\xd2\xff\x00\x00\x10\x00abc", "runs past the end of the file"),
        (b'{"conversation_id": "x"}', "byte 0 is no packet header"),
        (b"", "empty"),
    ],
    ids=[
        "old SKESK, partial SEIPD",
        "old SKESK, old SED to the end",
        "PKESK, SKESK, AEAD",
        "literal (gpg --store)",
        "compressed (gpg --store)",
        "literal after a session key",
        "no encrypted data",
        "a packet after the data",
        "truncated",
        "plaintext",
        "empty",
    ],
)
def test_only_openpgp_encrypted_data_passes_the_packet_check(tmp_path, data, why):
    (tmp_path / "x.gpg").write_bytes(data)
    found = openpgp.packet_refusal(tmp_path / "x.gpg")
    assert (found is None) if why is None else (why in found), found


def test_gpg_s_own_output_passes_and_gpg_store_does_not(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(gzip.compress(b'{"conversation_id": "x"}\n' * 5000))
    encrypt_file(plain, tmp_path / "enc.gpg", "passphrase")
    assert openpgp.packet_refusal(tmp_path / "enc.gpg") is None
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for args, tag in ((["--compress-algo", "none"], 11), ([], 8)):
        out = tmp_path / f"stored-{tag}.gpg"
        gpg = [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            *args,
            "--store",
            "-o",
            str(out),
            str(plain),
        ]
        subprocess.run(gpg, check=True, capture_output=True)
        assert f"first OpenPGP packet is {openpgp.NAMES[tag]} (tag {tag})" in openpgp.packet_refusal(out)


RESPONSES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@pytest.mark.parametrize("compression", ["snappy", "none"])
def test_a_response_that_quotes_its_instruction_passes_and_one_that_copies_it_does_not(
    private, tmp_path, compression
):
    """What the models wrote may quote its instruction, as the published responses do (a text to
    proofread, code to fix); a response that is mostly instruction text is a copy and is refused. Other
    columns refuse any match (test_every_value_...)."""
    quote = (
        f"ご依頼の内容は「{LONG[:60]}」ですね。以下に、会社の概要、沿革、主力製品、地域社会への貢献の順で、"
        + ("詳しくご紹介します。ベルゲンは港町として知られ、化学産業も盛んです。" * 4)
    )
    column = "synthesized_assistant_responses"
    for content, refused in ((quote, False), (LONG, True), (f"はい。{LONG}", True)):
        table = pa.table(
            {"id": ["1"], column: pa.array([[{"role": "assistant", "content": content}]], RESPONSES)}
        )
        path = tmp_path / "x.parquet"
        pq.write_table(table, path, compression=compression)
        found = leaks.scan(path, private)
        assert (found.leaks is not None) == refused, (content[:20], found.leaks)
        if refused:
            assert f"{column}[].content, row 0" in found.leaks
        lines = _jsonl_gz(
            tmp_path, [json.dumps({"id": "1", column: [{"role": "assistant", "content": content}]})]
        )
        assert (leaks.scan(lines, private).leaks is not None) == refused
