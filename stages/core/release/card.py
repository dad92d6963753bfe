"""The release's dataset card (README.md with the Hub's YAML front matter), so that
`datasets.load_dataset(<release dir>)` loads the public file with typed columns and a reader sees what
the files hold, under which licences, and what produced them."""

from __future__ import annotations

from pathlib import Path

import yaml

from stages.core.config.params import Params
from stages.core.release import flags
from stages.core.release.files import licence_texts
from stages.core.rows import fields

# The licences the published card names [V] (https://huggingface.co/datasets/tokyotech-llm/lmsys-chat-1m-synth,
# README): the instructions are LMSYS-Chat-1M derivatives; each model family's outputs (responses,
# judgements, translations) fall under its own terms. The deletion clause is quoted from the LMSYS-Chat-1M
# Dataset License Agreement [V] (https://huggingface.co/datasets/lmsys/lmsys-chat-1m, "Right to Request
# Deletion"); what it means for a licensee of a release is our reading (docs/assumptions.md).
LMSYS = (
    "LMSYS-Chat-1M Dataset License Agreement (https://huggingface.co/datasets/lmsys/lmsys-chat-1m): "
    "the Japanese instructions, in the encrypted file only. Its Right to Request Deletion clause: "
    '"At any time, we may require you to delete all copies of the conversation dataset (in whole or '
    'in part) in your possession and control. You will promptly comply with any and all such requests." '
    "Our reading, not legal advice: a licensee of this release may be asked to delete the decrypted "
    "instructions and whatever holds them (SFT files, caches, checkpoints); a rebuild after such a "
    "removal can have fewer rows than this release"
)
FAMILIES = {
    "llama": "Llama 3.1 Community License (https://www.llama.com/llama3_1/license/) and its Acceptable "
    'Use Policy: "Built with Llama"',
    "gemma": "Gemma Terms of Use (https://ai.google.dev/gemma/terms) and its Prohibited Use Policy",
}
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
FIELDS = {
    "conversation_id": "LMSYS-Chat-1M's conversation id: the join key with the encrypted instructions",
    fields.DUPLICATE: "the conversation_id of an earlier row with the same Japanese instruction, or null",
    fields.EMPTY: "true when the Japanese instruction is empty (no responses then)",
    fields.TEMPLATE: "the template category of the instruction (the publisher's or conf/translate's: see "
    "Flags above), or null",
    fields.RESPONSES: "responses to the Japanese instruction ({role, content}); up to n",
    fields.NOTES: "per response, in the same order: response_token_length, "
    "judgement (the judge's text), repetition_flag, preference_score (0-10; -1 when no rating was found)",
    fields.RESPONSES_EN: "responses to the original English instruction",
    fields.MULTITURN: "a list of one conversation from the best response: "
    "[[assistant, user, assistant]] (the best response, a synthesized follow-up and its answer) for the "
    "conversations the publisher's file has two-turn (see Flags above) and, among the rest, a share "
    "(models.<variant>.second_turn.share), else single-turn [[assistant]]; "
    "null without a best response or when the second turn failed. Prepend translated_conversation "
    "for the whole conversation",
}


def judge_line(prompt: dict | None) -> str:
    """The card's sentence on the judge prompt that scored the release (`judge_prompt`)."""
    if prompt is None:
        return "Judge prompt: none ran; the scores are the published file's (`generate.source: published`)."
    if prompt["uri"] is None:
        where = f"`{prompt['file']}` (this project's)"
    else:
        at = f" @ `{prompt['revision']}`" if prompt["revision"] else ""
        where = f"`{prompt['file']}` of `{prompt['uri']}`{at} (the publisher's)"
    return (
        f"Judge prompt: `{prompt['name']}` from {where}, sha256 `{prompt['sha256']}` "
        f"(`score.prompt: {prompt['setting']}`)."
    )


def licences(producers: dict) -> list[str]:
    """The licences of a release: LMSYS for the instructions, then the terms of each model family that
    produced rows (any role: generate, judge, second_turn, translate), naming the roles and models it
    covers; a producer without a model (DeepL) adds none."""
    roles = sorted(producers.get("models", {}).items())
    found = []
    for family, text in FAMILIES.items():
        used = [f"{role} (`{m['model']}`)" for role, m in roles if family in (m.get("model") or "").lower()]
        if used:
            found.append(f"{text}: covers {', '.join(used)}")
    return [LMSYS, *found, "Apache-2.0: this project's code"]


def size_category(rows: int) -> str:
    return next((label for limit, label in SIZES if rows < limit), "1M<n<10M")


def front_matter(params: Params, name: str, files: list[str], features: list[dict], rows: int) -> dict:
    """The Hub's dataset-card metadata: configs over the public files, with their features."""
    stem = params.release_stem(name)
    # one config: `datasets` picks one builder for a directory, so a second (Parquet) config would be
    # read as JSON; the same rows in Parquet load with load_dataset("parquet", data_files=...)
    public = next((f"{stem}.{s}" for s in ("jsonl.gz", "parquet") if f"{stem}.{s}" in files), None)
    configs = (
        [{"config_name": "default", "data_files": [{"split": "train", "path": public}]}] if public else []
    )
    info = [{"config_name": "default", "features": features}] if public else []
    languages = ["ja", "en"] if params.models[name].generate.n_en > 0 else ["ja"]
    return {
        "pretty_name": f"LMSYS-Chat-1M-Synth {params.models[name].release_name} (rebuilt)",
        "license": "other",
        "license_name": "lmsys-chat-1m-synth-mixed",
        "language": languages,
        "size_categories": [size_category(rows)],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "sft", "lmsys-chat-1m"],
        "configs": configs,
        "dataset_info": info,
    }


def _table(header: tuple[str, str], rows: list[tuple[object, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])


def code_rows(code: dict) -> list[tuple[str, str]]:
    """The card's provenance rows for the code a release was built from."""
    changed = ", ".join(f"`{f}`" for f in code["uncommitted"]) or "none"
    libraries = ", ".join(f"{k} {v}" for k, v in sorted(code["libraries"].items()))
    return [
        ("code: last commit that changed it", f"`{code['git_commit']}`"),
        ("code: uncommitted changes", changed),
        ("code: sha256 of its files", f"`{code['code_sha256']}`"),
        ("dependency lock: sha256", f"`{code['lock_sha256']}`"),
        ("libraries that write the files", libraries),
    ]


def scoring(mode: str, metrics: dict) -> str:
    """Which judge mode produced the release's scores (a server may ignore the one asked)."""
    line = f"Scores: judge mode `{mode}` (`score.mode`)"
    parsed = {
        "that the server answered without it (status `mode_ignored`)": metrics.get("judge_mode_ignored", 0),
        "with no rating in it (status `parsed_from_text`)": metrics.get("judge_parsed_from_text", 0),
        "cut at max_tokens (status `truncated`)": metrics.get("judge_truncated", 0),
    }
    if not any(parsed.values()):
        return line + ", for every judgement."
    which = "; ".join(f"{n:,} {why}" for why, n in parsed.items() if n)
    return line + f", except judgements scored by parsing their text: {which}."


# The published card's figures, in its words and order: "451,450 user instructions", "2,707,917 assistant
# responses", "134,014 multi-turn (2-turns) conversations", then an English portion likewise
# [V: https://huggingface.co/datasets/tokyotech-llm/lmsys-chat-1m-synth, README_gemma.md]. Its
# instruction figures count the instructions with at least one response [I: 5.998 responses each]; the
# release metric each row is counted by here.
PUBLISHED_CARD = "https://huggingface.co/datasets/tokyotech-llm/lmsys-chat-1m-synth"
JA_COUNTS = (
    ("Japanese instructions (with at least one response)", "instructions_with_responses"),
    ("Japanese responses", "responses_ja"),
)
MULTITURN_COUNT = ("multi-turn (two-turn) conversations", "multiturn_conversations")
EN_COUNTS = (
    ("English instructions (with a response)", "responses_en"),
    ("English responses", "responses_en"),
)


def published_counts(metrics: dict, n_en: int, second_turn: bool) -> list[tuple[str, str]]:
    """(label, value) of the figures the published card gives, as it counts them ([V], PUBLISHED_CARD):
    Japanese instructions with at least one response and responses, multi-turn conversations (a
    variant with a second turn), English instructions and responses (a variant with English). With
    one English response per instruction (n_en 1), the English instructions answered are the English
    responses; with more, that figure is left out (no metric counts them)."""
    rows = list(JA_COUNTS) + ([MULTITURN_COUNT] if second_turn else [])
    rows += list(EN_COUNTS) if n_en == 1 else [EN_COUNTS[1]] if n_en > 1 else []
    return [(label, f"{metrics.get(key, 0):,}") for label, key in rows]


def counts_section(metrics: dict, n_en: int, second_turn: bool) -> str:
    """The card's Counts: first the figures in the published card's words, counted its way ([V],
    PUBLISHED_CARD; its instruction figures leave out rows without responses), then every release metric
    by its own name."""
    return "\n\n".join(
        [
            "## Counts",
            "### As the published card counts them",  # its words and figures [V], PUBLISHED_CARD
            f"The published card ({PUBLISHED_CARD}) gives these figures for its own files, in these words; "
            "here they are counted the same way on this release. Its instruction figures count the "
            "instructions with at least one response (our reading of its counts): a released row without "
            "responses is not among them.",
            _table(("figure", "this release"), published_counts(metrics, n_en, second_turn)),
            "### All release metrics",
            "This project's own metrics, by name (the manifest's `metrics`): `instructions` counts every "
            "released row, answered or not.",
            _table(("metric", "value"), sorted(metrics.items())),
        ]
    )


def key_step(params: Params) -> str:
    """How a licensee derives the passphrase of the encrypted file, from the params that made it."""
    key = params.decrypt.key
    if key.method == "script":
        args = " ".join(a.replace("{source}", key.layout) for a in key.args)
        return (
            f"Run the published key script `{key.script}` (from `{params.fetch.released.uri}`; sha256 "
            f"`{key.sha256}`) with bash in a directory where your LMSYS-Chat-1M copy is named "
            f"`{key.layout}`: `bash {key.script.rsplit('/', 1)[-1]} {args}`. It prints the passphrase."
        )
    what = (
        f"the values of its column `{key.column}` (each as UTF-8 text and a newline)" if key.column else None
    )
    return (
        f"The passphrase is the {key.encoding} {key.hash} of {what or 'the bytes'} of the LMSYS-Chat-1M "
        f"files matching `{key.file}`, in sorted path order."
    )


def instructions_howto(params: Params, name: str, files: list[str]) -> str:
    """The card's steps from this release to its instructions, and to the SFT files."""
    encrypted = next((f for f in files if f.endswith(".gpg")), "the .gpg file")
    plain = encrypted.removesuffix(".gpg")
    stem = params.release_stem(name)
    sets = [n for n, o in params.sft.items() if o.variants is None or name in o.variants]
    steps = [
        "1. Accept the LMSYS-Chat-1M Dataset License Agreement at "
        "https://huggingface.co/datasets/lmsys/lmsys-chat-1m and download it: `huggingface-cli download "
        "lmsys/lmsys-chat-1m --repo-type dataset --local-dir lmsys-chat-1m`.",
        f"2. {key_step(params)}",
        f"3. Decrypt, with the passphrase on stdin: "
        f"`gpg --batch --pinentry-mode loopback --passphrase-fd 0 -d {encrypted} > {plain}`.",
        f"4. Join on `conversation_id`: each line of `{plain}` is "
        f"`{{conversation_id, {fields.INSTRUCTION}: [{{role: user, content}}]}}`.",
    ]
    join = [
        "```python",
        "import pandas as pd",
        f'records = pd.read_json("{stem}.jsonl.gz", lines=True)',
        f'instructions = pd.read_json("{plain}", lines=True)',
        'rows = records.merge(instructions, on="conversation_id")',
        "```",
    ]
    option_sets = f" (option sets: {', '.join(f'`{n}`' for n in sets)}; `conf/sft`)" if sets else ""
    return "\n\n".join(
        [
            "## Getting the instructions",
            "The Japanese instructions derive from LMSYS-Chat-1M: they are only in the encrypted file, whose "
            "passphrase comes from LMSYS-Chat-1M itself, so only its licensees can read them.",
            "\n".join(steps),
            "\n".join(join),
            "With this project at the release's tag, `python -m stages.fetch` and `python -m stages.decrypt` "
            "do steps 1 to 3 (the key procedure and its checksums are in `params.yaml`).",
            "## SFT files",
            "The files to train on (one `{conversation: [user, assistant, ...]}` per line, for TRL's "
            "`SFTTrainer`) hold the instructions, so they are not published. A licensee rebuilds them, byte "
            "for byte, from this release and the decrypted file, with this project at the release's tag: "
            f"`python -m stages.sft {name} --release-dir DIR --instructions {plain} --lmsys lmsys-chat-1m`"
            f"{option_sets}.",
        ]
    )


def texts_line(texts: list[str]) -> str:
    """The card's line on the licence texts copied into the release (stages/core/release/files.py)."""
    return (
        "The licence texts the published repository ships at its root, copied unchanged beside these "
        f"files: {', '.join(f'`{t}`' for t in texts)}."
    )


def file_licences(files: list[str], producers: dict, texts: list[str] = ()) -> list[tuple[str, str]]:
    """Which terms apply to each file of the release (our reading of the licences above); `texts` are
    the licence texts copied from the published repository."""
    models = [(m.get("model") or "").lower() for m in producers.get("models", {}).values()]
    families = [text.split(" (")[0] for family, text in FAMILIES.items() if any(family in m for m in models)]
    outputs = " and ".join(families) or "the producing models' terms"
    found = []
    for f in files:
        if f in texts:
            terms = "a licence text, copied unchanged from the published repository (its own terms)"
        elif f.endswith(".gpg"):
            terms = "LMSYS-Chat-1M Dataset License Agreement"
        elif f.endswith((".jsonl.gz", ".parquet")):
            terms = f"{outputs} (model outputs); the ids and flags of LMSYS-Chat-1M conversations"
        else:
            terms = "Apache-2.0 (written by this project)"
        found.append((f"`{f}`", terms))
    return found + [
        (f"`{f}`", "Apache-2.0 (written by this project)") for f in ("README.md", "manifest.json")
    ]


def dataset_card(params: Params, name: str, manifest: dict, features: list[dict]) -> str:
    """README.md of a release directory, from its manifest (files, metrics, producers, provenance)."""
    variant, metrics = params.models[name], manifest["metrics"]
    files = sorted(manifest["files"])
    texts = [f for f in files if f in {p.name for p in licence_texts(params.paths.released)}]
    meta = front_matter(params, name, files, features, metrics.get("instructions", 0))
    source = manifest["provenance"]
    en = variant.generate.n_en > 0
    sections = [
        f"# LMSYS-Chat-1M-Synth: {variant.release_name}\n",
        f"Rebuilt by lmsys-chat-1m-synth {manifest['producers']['project']['version']} (variant `{name}`). "
        f"Up to {variant.generate.n_ja} Japanese responses per instruction"
        + (f" and {variant.generate.n_en} English" if en else "; no English responses")
        + (", with a synthesized second turn" if variant.second_turn else "")
        + ". The Japanese instructions are only in the encrypted file (see *Licences*)."
        + ("" if en else " The file name keeps the published `ja+en`, though this variant has Japanese only.")
        + "\n\n"
        + scoring(variant.score.mode, metrics)
        + "\n\n"
        + flags.card_line(variant.annotations, metrics, variant.second_turn is not None)
        + ("\n\n" + judge_line(source["judge_prompt"]) if "judge_prompt" in source else "")
        + "\n",
        "## Files\n\n"
        + _table(
            ("file", "sha256 (size)"),
            [
                (f"`{f}`", f"`{manifest['files'][f]['sha256']}` ({manifest['files'][f]['size']:,} B)")
                for f in files
            ],
        ),
        counts_section(metrics, variant.generate.n_en, variant.second_turn is not None),
        "## Models\n\n"
        + _table(
            ("role", "model @ revision (engine and libraries)"),
            [
                (
                    role,
                    (f"`{m['model']}` @ `{m['revision']}`" if m["model"] else "(no model)")
                    + f" ({m['engine']}: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(m["libraries"].items()))
                    + ")",
                )
                for role, m in sorted(manifest["producers"]["models"].items())
            ],
        ),
        "## Provenance\n\n"
        + _table(
            ("what", "value"),
            [
                *((f"{k} (`{s['uri']}`)", f"`{s['revision']}`") for k, s in source["sources"].items()),
                ("subset", source["subset"]),
                ("params fingerprint", f"`{source['params_fingerprint']}`"),
                *(
                    (f"publisher's `{path}` (at the released revision)", f"sha256 `{sha}`")
                    for path, sha in source.get("published_materials", {}).items()
                ),
                *code_rows(source["code"]),
            ],
        )
        + "\n\nThe release is tagged on the commit whose `dvc.lock` records these files.",
        "## Fields\n\n"
        + _table(("field", "meaning"), [(f"`{f['name']}`", FIELDS.get(f["name"], "")) for f in features]),
        instructions_howto(params, name, files),
        "## Licences\n\n"
        + "\n".join(f"- {text}" for text in licences(manifest["producers"]))
        + (f"\n- {texts_line(texts)}" if texts else "")
        + "\n\nBy file (our reading, not legal advice):\n\n"
        + _table(("file", "terms"), file_licences(files, manifest["producers"], texts)),
    ]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=10**6)
    return f"---\n{header}---\n\n" + "\n\n".join(sections) + "\n"


def write_card(params: Params, name: str, manifest: dict, features: list[dict], out: Path) -> None:
    (out / "README.md").write_text(dataset_card(params, name, manifest, features), encoding="utf-8")
