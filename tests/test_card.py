"""The release directory is a Hugging Face dataset: its card, its configs and its provenance."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.release import card
from stages.core.release.provenance import provenance
from tests.conftest import run_stage


@pytest.fixture
def released(workspace, monkeypatch, fake_engine) -> Path:
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma2")
    return workspace / "data/release/gemma2"


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_describes_the_release(released: Path):
    text = (released / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(text)
    manifest = json.loads((released / "manifest.json").read_text())
    assert meta["license"] == "other" and meta["language"] == ["ja", "en"]
    assert meta["size_categories"] == ["n<1K"]
    assert [c["config_name"] for c in meta["configs"]] == ["default"]
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": "gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"}
    ]
    names = [f["name"] for f in meta["dataset_info"][0]["features"]]
    assert "synthesized_multiturn_conversation" in names and "translated_conversation" not in names
    for licence in ("LMSYS-Chat-1M Dataset License Agreement", "Right to Request Deletion", "Apache-2.0"):
        assert licence in text
    assert "Gemma Terms" not in text and "Llama 3.1" not in text  # the sample's tiny model made it
    assert f"`{manifest['provenance']['params_fingerprint']}`" in text
    assert manifest["subset"] == "ja" and manifest["provenance"]["subset"] == "ja"
    assert f"| instructions | {manifest['metrics']['instructions']} |" in text
    assert "README.md" not in manifest["files"]


def test_the_card_counts_as_the_published_card_does_then_lists_every_metric(released: Path):
    """The published card's "451,450 user instructions" counts those with at least one response: the
    card's first table says so and counts them so; `instructions` (every row) is in the second."""
    text = (released / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((released / "manifest.json").read_text())["metrics"]
    counts = text.split("## Counts\n", 1)[1].split("\n## ", 1)[0]
    theirs, ours = counts.split("### All release metrics", 1)
    assert "### As the published card counts them" in theirs
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", theirs, re.M)[1:]  # after the header
    assert rows == [
        ("Japanese instructions (with at least one response)", f"{metrics['instructions_with_responses']:,}"),
        ("Japanese responses", f"{metrics['responses_ja']:,}"),
        ("multi-turn (two-turn) conversations", f"{metrics['multiturn_conversations']:,}"),
        ("English instructions (with a response)", f"{metrics['responses_en']:,}"),
        ("English responses", f"{metrics['responses_en']:,}"),
    ]
    # the sample has empty and duplicate instructions: every row is not an answered instruction
    assert 0 < metrics["instructions_with_responses"] < metrics["instructions"]
    assert f"| instructions | {metrics['instructions']} |" in ours
    assert f"| instructions_with_responses | {metrics['instructions_with_responses']} |" in ours
    assert "| instructions |" not in theirs


@pytest.mark.parametrize(
    ("n_en", "second_turn", "labels"),
    [
        (0, False, ["Japanese instructions (with at least one response)", "Japanese responses"]),
        (
            1,
            False,
            [
                "Japanese instructions (with at least one response)",
                "Japanese responses",
                "English instructions (with a response)",
                "English responses",
            ],
        ),
        (  # several English responses an instruction: no metric counts the English instructions answered
            2,
            True,
            [
                "Japanese instructions (with at least one response)",
                "Japanese responses",
                "multi-turn (two-turn) conversations",
                "English responses",
            ],
        ),
    ],
)
def test_the_published_card_figures_follow_the_variant(n_en: int, second_turn: bool, labels: list[str]):
    metrics = {
        "instructions": 2_000_000,
        "instructions_with_responses": 1_234_567,
        "responses_ja": 7_000_000,
        "responses_en": 1_200_000,
        "multiturn_conversations": 400_000,
    }
    found = card.published_counts(metrics, n_en, second_turn)
    assert [label for label, _ in found] == labels
    assert found[0] == ("Japanese instructions (with at least one response)", "1,234,567")
    assert "2,000,000" not in {value for _, value in found}  # every row is no published figure


def test_datasets_loads_the_release_directory_with_one_schema(released: Path, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")
    from_json = datasets.load_dataset(str(released), split="train", cache_dir=cache)
    parquet = str(released / "gemma2-lmsys-chat-1m-synth-ja+en.parquet")
    from_parquet = datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=cache)
    assert from_json.features == from_parquet.features
    assert (
        from_json.num_rows
        == from_parquet.num_rows
        == json.loads((released / "manifest.json").read_text())["metrics"]["instructions"]
    )
    assert from_json[0] == from_parquet[0]
    conversations = from_json.features["synthesized_multiturn_conversation"]  # a list of conversations
    assert {"role", "content"} <= set(conversations.feature.feature)


def test_a_gemma3_card_says_its_file_has_no_english(workspace, monkeypatch):
    from stages.core.config.params import load_params

    run_stage(monkeypatch, "fetch")  # the judge prompt the card names (score.prompt published)
    params = load_params(workspace / "params.yaml")
    manifest = {
        "files": {"gemma3-lmsys-chat-1m-synth-ja+en.jsonl.gz": {"sha256": "0" * 64, "size": 1}},
        "metrics": {"instructions": 2_000},
        "producers": {
            "project": {"version": "0.1.0"},
            "models": {
                "judge": {
                    "model": "google/gemma-3-27b-it",
                    "revision": "r",
                    "engine": "vllm",
                    "libraries": {},
                }
            },
        },
        "provenance": provenance(params, "gemma3"),
    }
    text = card.dataset_card(params, "gemma3", manifest, [{"name": "conversation_id", "dtype": "string"}])
    meta = _front_matter(text)
    assert meta["language"] == ["ja"] and meta["size_categories"] == ["1K<n<10K"]
    assert meta["configs"][0]["data_files"][0]["path"].endswith(".jsonl.gz")
    assert "keeps the published `ja+en`, though this variant has Japanese only" in text
    assert manifest["provenance"]["subset"] == "ja+unsafe"


def test_licences_follow_the_models_that_produced_the_release():
    def producers(*models: str) -> dict:
        return {"models": {f"role{i}": {"model": m} for i, m in enumerate(models)}}

    gemma = card.licences(producers("google/gemma-2-27b-it", "google/gemma-2-27b-it"))
    assert [t.split(" (")[0].split(":")[0] for t in gemma] == [
        "LMSYS-Chat-1M Dataset License Agreement",
        "Gemma Terms of Use",
        "Apache-2.0",
    ]
    both = card.licences(producers("google/gemma-3-27b-it", "meta-llama/Llama-3.1-70B-Instruct"))
    assert any("Llama 3.1 Community License" in t for t in both) and any("Gemma Terms" in t for t in both)


def test_a_llama_translator_and_a_gemma_generator_list_both_families_and_the_deletion_clause():
    producers = {
        "models": {
            "generate": {"model": "google/gemma-3-27b-it"},
            "judge": {"model": "google/gemma-3-27b-it"},
            "translate": {"model": "meta-llama/Llama-3.1-70B-Instruct"},
        }
    }
    found = card.licences(producers)
    llama = next(t for t in found if t.startswith("Llama 3.1 Community License"))
    gemma = next(t for t in found if t.startswith("Gemma Terms of Use"))
    assert "translate (`meta-llama/Llama-3.1-70B-Instruct`)" in llama and "generate" not in llama
    assert "generate (`google/gemma-3-27b-it`), judge (`google/gemma-3-27b-it`)" in gemma
    assert "Right to Request Deletion" in found[0] and "delete all copies" in found[0]
    # DeepL is a translator without a model: it adds no family
    deepl = card.licences(
        {"models": {"translate": {"backend": "deepl"}, "generate": producers["models"]["generate"]}}
    )
    assert not any(t.startswith("Llama") for t in deepl) and any(t.startswith("Gemma") for t in deepl)


def test_a_deepl_translator_is_a_producer_without_a_model():
    from stages.core.rows.records import producers

    found = producers({"translate": {"backend": "deepl", "libraries": {"deepl": "1.2"}, "formality": None}})
    assert found["models"]["translate"] == {
        "model": None,
        "revision": None,
        "dtype": None,
        "quantization": None,
        "engine": "deepl",
        "libraries": {"deepl": "1.2"},
    }


def test_the_card_says_which_judge_mode_produced_the_scores():
    from stages.core.release.card import scoring

    assert scoring("structured", {"judge_mode_ignored": 0}) == (
        "Scores: judge mode `structured` (`score.mode`), for every judgement."
    )
    assert scoring("logprob", {"judge_mode_ignored": 1234}) == (
        "Scores: judge mode `logprob` (`score.mode`), except judgements scored by parsing their text: "
        "1,234 that the server answered without it (status `mode_ignored`)."
    )
    assert scoring("logprob", {"judge_parsed_from_text": 5, "judge_truncated": 2}) == (
        "Scores: judge mode `logprob` (`score.mode`), except judgements scored by parsing their text: "
        "5 with no rating in it (status `parsed_from_text`); 2 cut at max_tokens (status `truncated`)."
    )


def test_code_provenance_does_not_move_with_unrelated_history_and_names_uncommitted_code(tmp_path):
    import subprocess

    from stages.core.release.provenance import code_provenance

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.py").write_text("x = 1\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "README.md").write_text("v0.1\n")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "v0.1"], ["tag", "v0.1"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True)
    first = code_provenance(tmp_path)
    assert first["uncommitted"] == [] and len(first["git_commit"]) == 40
    (tmp_path / "README.md").write_text("v0.2\n")  # history moves, the code does not
    (tmp_path / "stages" / "__pycache__").mkdir()
    (tmp_path / "stages" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    for args in (["commit", "-qam", "v0.2"], ["tag", "v0.2"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True)
    assert code_provenance(tmp_path) == first
    (tmp_path / "stages" / "a.py").write_text("x = 2\n")
    dirty = code_provenance(tmp_path)
    assert dirty["uncommitted"] == ["stages/a.py"] and dirty["git_commit"] == first["git_commit"]
    assert dirty["code_sha256"] != first["code_sha256"]


def test_a_licensee_following_the_card_gets_the_instructions_of_every_record(released: Path, tmp_path):
    """The card's steps, run as written: its key command, its gpg command, its join snippet."""
    import shutil
    import subprocess

    text = (released / "README.md").read_text(encoding="utf-8")
    workspace = released.parents[2]
    key_command = re.search(r"`(bash [^`]+)`", text)[1]
    gpg_command = re.search(r"`(gpg [^`]+)`", text)[1]
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1]
    script = re.search(r"published key script `([^`]+)`", text)[1]
    (tmp_path / "lmsys-chat-1m").symlink_to(workspace / "data/sample/lmsys-chat-1m")
    shutil.copy(workspace / "data/sample/lmsys-chat-1m-synth" / script, tmp_path)
    for name in released.iterdir():
        shutil.copy(name, tmp_path)
    passphrase = subprocess.run(
        key_command, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    subprocess.run(
        gpg_command, shell=True, cwd=tmp_path, input=passphrase.stdout.strip(), text=True, check=True
    )
    found: dict = {}
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        exec(snippet, found)  # the card's own code, as a reader runs it
    finally:
        os.chdir(cwd)
    rows, records = found["rows"], found["records"]
    assert len(rows) == len(records) > 0  # every released record has its instruction
    turns = [(t[0]["role"], bool(t[0]["content"].strip())) for t in rows["translated_conversation"]]
    # translate's empty flag: the release's is the publisher's where its file has the row (test_annotations)
    translated = pq.read_table(workspace / "data/private/translated-ja.parquet").to_pylist()
    empty = {r["conversation_id"]: r["empty_user_instruction_ja"] for r in translated}
    assert turns == [("user", not empty[c]) for c in rows["conversation_id"]]
    assert (
        "python -m stages.sft gemma2 --release-dir DIR" in text
        and "`lmsys-chat-1m-synth-ja-gemma2-2turn-wo-pii-and-template-instructions`" in text
    )
    by_file = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", text.split("By file")[1], re.M))
    assert by_file["lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg"].startswith("LMSYS-Chat-1M")
    assert by_file["manifest.json"].startswith("Apache-2.0")
    assert set(by_file) == {p.name for p in released.iterdir()}  # every file of the release
