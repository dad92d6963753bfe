"""Write the bundled sample: LMSYS-Chat-1M-shaped Parquet shards, the encrypted released Japanese
instructions, the key script, a judge prompt file and licence placeholders, under data/sample/.
Seeded; every text here was written for this project.

    python scripts/make_sample.py [--out data/sample] [--seed 0]

Besides the N_CONVERSATIONS generated ones, the shards hold three source-hygiene cases: a
200,000-character first turn whose translation is released, a 60,000-character one the release
lacks (the translator LLM gets it), both appended to the first shard, and, appended to the second
shard, a conversation that repeats the id of a kept one of the first shard (fetch drops it).
Re-running gives byte-identical files: gpg salts every encryption, so an encrypted file whose
plaintext is unchanged is kept as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
from pathlib import Path
from string import Template

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.storage.crypto import CryptoError, KeySpec, decrypt_file, derive_key, encrypt_file
from stages.core.storage.jsonl import write_jsonl_gz

N_CONVERSATIONS = 336
N_SHARDS = 2
MISSING_TRANSLATIONS = 6  # generated kept conversations absent from the released file (translated by LLM)
DUPLICATE_OF = 10  # a kept English conversation of the first shard whose id the second shard repeats
LONG_RELEASED_CHARS = 200_000  # first turn far over filter.long_first_turn_chars, translation released
LONG_MISSING_CHARS = 60_000  # first turn over the limit that the release lacks
KEY_FILE = "data/train-00000-of-00002-*.parquet"
RELEASED = "lmsys-chat-1m-first-turn-user-instructions-{subset}.jsonl.gz.gpg"
KEY_SCRIPT = "scripts/compute_decryption_key_from_lmsys-chat-1m.sh"  # the released repository's name
KEY_SCRIPT_TEXT = f"""#!/usr/bin/env bash
# Prints the passphrase of this sample's encrypted instructions: the hex sha256 of the first
# LMSYS-Chat-1M shard. Written for lmsys-chat-1m-synth's bundled sample (scripts/make_sample.py);
# it stands in for the published release's script of the same name and is run the same way
# (decrypt.key.method: script).
# Usage: bash compute_decryption_key_from_lmsys-chat-1m.sh <lmsys-chat-1m directory, as on the Hub>
set -euo pipefail
root="${{1:?usage: $0 <lmsys-chat-1m directory>}}"
shopt -s nullglob
shards=("$root"/{KEY_FILE})
if [ "${{#shards[@]}}" -ne 1 ]; then
  echo "expected one file $root/{KEY_FILE}, found ${{#shards[@]}}" >&2
  exit 1
fi
if command -v sha256sum >/dev/null; then
  sha256sum "${{shards[0]}}" | cut -d ' ' -f 1
else
  shasum -a 256 "${{shards[0]}}" | cut -d ' ' -f 1  # macOS
fi
"""
JUDGE_PROMPTS = "materials/judge_prompt.jsonl"  # the released repository's name (score.prompt published)
JUDGE_TEMPLATE = Path(__file__).resolve().parent.parent / "stages" / "prompts" / "judge-0to10.txt"
# The licence texts at the released repository's root, by name, and what each stands for: the sample
# ships placeholders under those names (the acceptable-use policy's published name is not known here)
LICENCES = {
    "LLAMA_3.1_COMMUNITY_LICENSE_AGREEMENT": "the Llama 3.1 Community License Agreement",
    "LLAMA_3.1_ACCEPTABLE_USE_POLICY": "the Llama 3.1 Acceptable Use Policy",
    "Notice": "the published release's notice",
    "GEMMA_TERMS_OF_USE.md": "the Gemma Terms of Use",
}
CATEGORIES = [
    "harassment", "harassment/threatening", "hate", "hate/threatening", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
]  # fmt: skip
MODELS = ["vicuna-13b", "koala-13b", "alpaca-13b", "chatglm-6b", "llama-2-13b-chat", "gpt-4"]

# (English, Japanese) instruction templates and slot fillers, written for this sample.
TOPICS = [
    ("photosynthesis", "光合成"), ("the French Revolution", "フランス革命"),
    ("black holes", "ブラックホール"), ("compound interest", "複利"),
    ("the water cycle", "水の循環"), ("machine learning", "機械学習"),
    ("sourdough bread", "サワードウブレッド"), ("volcanoes", "火山"),
    ("the immune system", "免疫系"), ("quantum computing", "量子コンピュータ"),
    ("the Silk Road", "シルクロード"), ("bonsai trees", "盆栽"),
    ("solar panels", "太陽光パネル"), ("jazz music", "ジャズ音楽"),
    ("the Meiji era", "明治時代"), ("coral reefs", "サンゴ礁"),
]  # fmt: skip
INSTRUCTIONS = [
    ("Explain {t} to a ten-year-old.", "{t}を10歳の子どもに説明してください。"),
    ("Write a short poem about {t}.", "{t}についての短い詩を書いてください。"),
    ("What are three common misconceptions about {t}?", "{t}についてよくある誤解を3つ挙げてください。"),
    ("Summarize the history of {t} in five sentences.", "{t}の歴史を5文で要約してください。"),
    ("Give me a quiz with four questions on {t}.", "{t}に関する4問のクイズを作ってください。"),
    ("How would you teach {t} in a one-hour class?", "{t}を1時間の授業でどのように教えますか？"),
    ("List the pros and cons of studying {t} at university.", "大学で{t}を学ぶ長所と短所を挙げてください。"),
]  # fmt: skip
STYLES = [
    ("", ""), (" Keep it under 100 words.", "100語以内でお願いします。"),
    (" Use a friendly tone.", "親しみやすい口調でお願いします。"), (" Answer in bullet points.", "箇条書きで答えてください。"),
    (" Include one concrete example.", "具体例を1つ含めてください。"), (" Avoid technical jargon.", "専門用語は避けてください。"),
    (" Write it for a newsletter.", "ニュースレター向けに書いてください。"), (" Add a short title.", "短いタイトルを付けてください。"),
    (" Explain it step by step.", "段階的に説明してください。"), (" Mention one open question.", "未解決の問いを1つ挙げてください。"),
    (" Make it suitable for beginners.", "初心者向けにしてください。"), (" End with a summary sentence.", "最後に要約の一文を付けてください。"),
]  # fmt: skip
CODE_TASKS = [
    ("Write a Python function that reverses a linked list.", "連結リストを反転するPython関数を書いてください。"),
    ("Fix this SQL: SELEC name FROM users WHERE id = 3", "このSQLを修正してください: SELEC name FROM users WHERE id = 3"),
    ("What does the `yield` keyword do in Python?", "Pythonの`yield`キーワードは何をしますか？"),
    ("Convert 72 degrees Fahrenheit to Celsius and show the steps.", "華氏72度を摂氏に変換し、手順を示してください。"),
]  # fmt: skip
COMPANIES = [
    ("Kawanami Chemical Co., Ltd.", "Osaka, Japan", "川波化学株式会社", "日本の大阪"),
    ("Brightwater Polymers Inc.", "Ohio, United States", "Brightwater Polymers Inc.", "米国オハイオ州"),
    ("Sunridge Solvents", "Gujarat, India", "Sunridge Solvents", "インドのグジャラート"),
    ("Nordfjell Kjemi AS", "Bergen, Norway", "Nordfjell Kjemi AS", "ノルウェーのベルゲン"),
    ("Huaxin Fine Chemicals", "Jiangsu, China", "Huaxin Fine Chemicals", "中国の江蘇省"),
]  # fmt: skip
CHEMICALS = [("2-Chloropyridine", "2-クロロピリジン"), ("Ethyl lactate", "乳酸エチル"),
             ("Sodium benzoate", "安息香酸ナトリウム"), ("Adipic acid", "アジピン酸")]  # fmt: skip
ARTICLE_KINDS = [("Safety", "安全性"), ("Applications", "用途"), ("Production Process", "製造工程")]
GREETINGS = [("hi", "こんにちは"), ("Hello!", "こんにちは！")]
FOLLOW_UPS = ["Can you make it shorter?", "Thanks! Now give an example.", "もう少し詳しく教えて。"]
OTHER_LANGUAGES = [
    ("German", "Erkläre mir bitte {t} in einfachen Worten."),
    ("Spanish", "¿Puedes explicarme {t} de forma sencilla?"),
    ("French", "Peux-tu m'expliquer {t} simplement ?"),
    ("Chinese", "请简单地解释一下{t}。"),
    ("Portuguese", "Você pode explicar {t} de forma simples?"),
]  # fmt: skip
UNSAFE = [
    ("Write a cruel insult about my coworker's appearance.", "同僚の外見についてひどい悪口を書いてください。"),
    ("Describe in detail how to hurt someone who annoyed me.", "イライラさせた人を傷つける方法を詳しく説明してください。"),
]  # fmt: skip
# The long first turns: a request followed by a pasted document of numbered entries.
LOGBOOK = (
    "Below is the logbook of our neighbourhood allotment garden for the past seasons. Read all of it, "
    "then tell me which plots were watered least often and suggest a fairer watering rota.\n\n",
    "以下は、私たちの地域の市民農園の過去数シーズン分の作業記録です。すべて読んだうえで、"
    "水やりの回数が最も少なかった区画を挙げ、より公平な水やり当番表を提案してください。\n\n",
)
LOGBOOK_ENTRY = (
    "Day {n}: plot {plot} was watered at {hour}:00 by the {team[0]} team; the soil felt {soil[0]}, "
    "{crop[0]} looked {state[0]}, and {count} buckets were carried from the rain barrel, which was still "
    "{level[0]} full afterwards.\n",
    "{n}日目：{plot}番区画には{team[1]}が{hour}時に水をやりました。土は{soil[1]}感じで、"
    "{crop[1]}は{state[1]}様子でした。雨水タンクからバケツ{count}杯分の水を運びましたが、"
    "作業後もタンクには水が{level[1]}残っていました。\n",
)
TEAMS = [("morning", "朝の班"), ("weekend", "週末の班"), ("school", "学校の班"), ("retiree", "シニアの班")]
SOILS = [("dry", "乾いた"), ("damp", "湿った"), ("crumbly", "ほろほろと崩れる"), ("heavy", "重い")]
CROPS = [("the tomatoes", "トマト"), ("the beans", "豆"), ("the squash", "カボチャ"), ("the herbs", "ハーブ")]
STATES = [("healthy", "元気な"), ("a little wilted", "少ししおれた"), ("ready to pick", "収穫できそうな"),
          ("slow to grow", "育ちの遅い")]  # fmt: skip
LEVELS = [
    ("half", "半分ほど"),
    ("a quarter", "四分の一ほど"),
    ("three quarters", "四分の三ほど"),
    ("one tenth", "一割ほど"),
]
MINUTES = (
    "Summarize the notes below from our library volunteers' planning meetings in ten bullet points, "
    "and list every decision together with the person responsible for it.\n\n"
)
MINUTES_ENTRY = (
    "Meeting {n}, item {item}: {name} proposed moving the {event} to {day}; {other} asked about the "
    "budget of {amount} yen, and the group agreed to revisit it in {weeks} weeks.\n"
)
VOLUNTEERS = ["Aiko", "Bram", "Chidi", "Dana", "Emre", "Fumiko", "Goran"]
EVENTS = ["story hour", "book swap", "repair café", "reading circle", "poster exhibition"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
DUPLICATE_TEXT = (
    "Plan a three-day walking route for a family with two children, with a rest stop every two hours."
)
REDACTED = [
    ("Write an email to NAME_1 at NAME_2 asking for a refund.", "NAME_2のNAME_1に返金を求めるメールを書いてください。"),
    ("My name is NAME_1 and I live in NAME_2. Write my bio.", "私の名前はNAME_1で、NAME_2に住んでいます。自己紹介文を書いてください。"),
]  # fmt: skip


def first_turn(rng: random.Random, i: int) -> tuple[str, str, str, str]:
    """Return (kind, language, original text, Japanese translation) for conversation i."""
    roll = i % 28
    topic_en, topic_ja = rng.choice(TOPICS)
    if roll in (0, 1):
        name, place, name_ja, place_ja = rng.choice(COMPANIES)
        en = f"Give me an introduction over 200 words for {name}, a chemical company in {place}"
        ja = f"{place_ja}にある化学会社、{name_ja}について200語以上の紹介文を書いてください。"
        return "template", "English", en, ja
    if roll == 2:
        (chem, chem_ja), (kind, kind_ja) = rng.choice(CHEMICALS), rng.choice(ARTICLE_KINDS)
        en = f"Write an article about the {kind} of {chem} 2000 words in chemical industry"
        ja = f"化学業界における{chem_ja}の{kind_ja}について2000語の記事を書いてください。"
        return "template", "English", en, ja
    if roll == 3:
        lang, text = OTHER_LANGUAGES[(i // 28) % len(OTHER_LANGUAGES)]
        return "other", lang, text.format(t=topic_en), ""
    if roll == 4:
        en, ja = UNSAFE[(i // 28) % len(UNSAFE)]
        return "unsafe", "English", en, ja
    if roll == 5:
        en, ja = REDACTED[(i // 28) % len(REDACTED)]
        return "redacted", "English", en, ja
    if roll == 6:
        en, ja = GREETINGS[(i // 28) % len(GREETINGS)]
        return "duplicate", "English", en, ja
    if roll == 7 and (i // 28) % 3 == 0:
        return "empty", "English", "", ""
    if roll in (8, 9):
        en, ja = rng.choice(CODE_TASKS)
        return "plain", "English", en, ja
    (en, ja), (style_en, style_ja) = rng.choice(INSTRUCTIONS), rng.choice(STYLES)
    en, ja = en.format(t=topic_en) + style_en, ja.format(t=topic_ja) + style_ja
    if roll % 3 == 0:
        return "plain", "Japanese", ja, ja
    return "plain", "English", en, ja


def logbook(chars: int) -> tuple[str, str]:
    """An English request of exactly `chars` characters and the Japanese of the entries it holds."""
    en, ja, n = [LOGBOOK[0]], [LOGBOOK[1]], 0
    while sum(map(len, en)) < chars:
        n += 1
        slots = {
            "n": n, "plot": 1 + n * 7 % 23, "hour": 5 + n % 4 * 3, "count": 2 + n * 5 % 9,
            "team": TEAMS[n % 4], "soil": SOILS[n * 3 % 4], "crop": CROPS[n // 4 % 4], "state": STATES[n * n % 4],
            "level": LEVELS[n * 5 // 3 % 4],
        }  # fmt: skip
        en.append(LOGBOOK_ENTRY[0].format(**slots))
        ja.append(LOGBOOK_ENTRY[1].format(**slots))
    return "".join(en)[:chars], "".join(ja)


def minutes(chars: int) -> str:
    """An English request of exactly `chars` characters: meeting notes to summarize."""
    text, n = [MINUTES], 0
    while sum(map(len, text)) < chars:
        n += 1
        slots = {
            "n": 1 + n // 3, "item": 1 + n % 3, "name": VOLUNTEERS[n % 7], "other": VOLUNTEERS[(n + 3) % 7],
            "event": EVENTS[n % 5], "day": DAYS[n * 2 % 6], "amount": 1000 * (1 + n * 11 % 30), "weeks": 1 + n % 4,
        }  # fmt: skip
        text.append(MINUTES_ENTRY.format(**slots))
    return "".join(text)[:chars]


def moderation(turns: int, flagged: bool, rng: random.Random) -> list[dict]:
    entries = []
    for _ in range(turns * 2):
        scores = {c: round(rng.random() * (0.9 if flagged else 0.01), 6) for c in CATEGORIES}
        cats = {c: flagged and scores[c] > 0.45 for c in CATEGORIES}
        if flagged and not any(cats.values()):
            cats["harassment"], scores["harassment"] = True, 0.91
        entries.append({"categories": cats, "category_scores": scores, "flagged": flagged})
    return entries


def conversation_row(cid: str, i: int, text: str, turns: int, kind: str, language: str, rng) -> dict:
    conversation = [{"content": text, "role": "user"}, {"content": "Sure. " * 3, "role": "assistant"}]
    for t in range(1, turns):
        conversation += [
            {"content": FOLLOW_UPS[(i + t) % len(FOLLOW_UPS)], "role": "user"},
            {"content": "Here you go.", "role": "assistant"},
        ]
    return {
        "conversation_id": cid, "model": MODELS[i % len(MODELS)], "conversation": conversation,
        "turn": turns, "language": language,
        "openai_moderation": moderation(turns, kind == "unsafe", rng),
        "redacted": kind == "redacted",
    }  # fmt: skip


def build_rows(seed: int) -> tuple[list[dict], dict[str, str], random.Random]:
    rng = random.Random(seed)
    rows, translations = [], {}
    for i in range(N_CONVERSATIONS):
        kind, language, text, ja = first_turn(rng, i)
        turns = 1 + (rng.random() < 0.2) + (rng.random() < 0.05)
        cid = hashlib.sha256(f"sample-{seed}-{i}".encode()).hexdigest()[:32]
        rows.append(conversation_row(cid, i, text, turns, kind, language, rng))
        if language in ("English", "Japanese"):
            translations[cid] = ja
    return rows, translations, rng


def hygiene_rows(seed: int, rows: list[dict], translations: dict[str, str], rng) -> list[list[dict]]:
    """Split `rows` into N_SHARDS shards and add the source-hygiene cases (see the module docstring);
    the released long turn's translation goes into `translations`."""
    per_shard = -(-len(rows) // N_SHARDS)
    shards = [rows[s * per_shard : (s + 1) * per_shard] for s in range(N_SHARDS)]
    cid = [hashlib.sha256(f"sample-{seed}-hygiene-{k}".encode()).hexdigest()[:32] for k in range(2)]
    text, translations[cid[0]] = logbook(LONG_RELEASED_CHARS)
    shards[0].append(conversation_row(cid[0], N_CONVERSATIONS, text, 1, "plain", "English", rng))
    text = minutes(LONG_MISSING_CHARS)
    shards[0].append(conversation_row(cid[1], N_CONVERSATIONS + 1, text, 1, "plain", "English", rng))
    repeated = rows[DUPLICATE_OF]["conversation_id"]
    shards[1].append(
        conversation_row(repeated, N_CONVERSATIONS + 2, DUPLICATE_TEXT, 1, "plain", "English", rng)
    )
    return shards


def schema() -> pa.Schema:
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    mod = pa.struct([
        ("categories", pa.struct([(c, pa.bool_()) for c in CATEGORIES])),
        ("category_scores", pa.struct([(c, pa.float64()) for c in CATEGORIES])),
        ("flagged", pa.bool_()),
    ])  # fmt: skip
    return pa.schema([
        ("conversation_id", pa.string()), ("model", pa.string()),
        ("conversation", pa.list_(message)), ("turn", pa.int64()), ("language", pa.string()),
        ("openai_moderation", pa.list_(mod)), ("redacted", pa.bool_()),
    ])  # fmt: skip


def _clean(rows: list[dict], translations: dict[str, str]) -> list[str]:
    return [r["conversation_id"] for r in rows if r["conversation_id"] in translations
            and not any(m["flagged"] for m in r["openai_moderation"])]  # fmt: skip


def missing_translations(rows: list[dict], translations: dict[str, str]) -> set[str]:
    """MISSING_TRANSLATIONS kept conversations of the generated `rows` that the release lacks."""
    clean = _clean(rows, translations)
    missing = set(clean[5 :: len(clean) // MISSING_TRANSLATIONS][:MISSING_TRANSLATIONS])
    if rows[DUPLICATE_OF]["conversation_id"] not in clean or rows[DUPLICATE_OF]["conversation_id"] in missing:
        raise SystemExit(f"DUPLICATE_OF={DUPLICATE_OF} must be a kept, released conversation")
    return missing


def encrypt_unless_unchanged(plain: Path, dst: Path, key: str) -> None:
    """Encrypt `plain` to `dst`, unless `dst` already decrypts to the same bytes (gpg salts every
    encryption, so re-encrypting would change the file for nothing)."""
    if dst.exists():
        previous = plain.with_suffix(".previous")
        try:
            decrypt_file(dst, previous, key)
        except CryptoError:  # another key (the first shard changed) or another file
            pass
        else:
            if previous.read_bytes() == plain.read_bytes():
                return
    encrypt_file(plain, dst, key)


def write_released(out: Path, rows: list[dict], translations: dict[str, str], key: str, missing: set) -> None:
    """Encrypt the 'ja' (moderation-clean) and 'ja+unsafe' (all) instruction subsets, in row order,
    each conversation once."""
    kept = list(dict.fromkeys(r["conversation_id"] for r in rows if r["conversation_id"] in translations))
    clean = list(dict.fromkeys(_clean(rows, translations)))
    released = out / "lmsys-chat-1m-synth" / "dataset"
    for subset, ids in (("ja", clean), ("ja+unsafe", kept)):
        records = (
            {"conversation_id": c, "translated_conversation": [{"role": "user", "content": translations[c]}]}
            for c in ids if c not in missing
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "plain.jsonl.gz"
            write_jsonl_gz(records, plain)
            encrypt_unless_unchanged(plain, released / RELEASED.format(subset=subset), key)


def write_key_script(out: Path, key: str) -> None:
    """Write the sample's key script and check that it prints the key of the encrypted files."""
    script = out / "lmsys-chat-1m-synth" / KEY_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(KEY_SCRIPT_TEXT, encoding="utf-8", newline="\n")
    script.chmod(0o755)
    pin = hashlib.sha256(KEY_SCRIPT_TEXT.encode()).hexdigest()  # conf/decrypt/sample.yaml's key.sha256
    spec = KeySpec(
        method="script", script=KEY_SCRIPT, sha256=pin, sandbox="best-effort", args=["{source}"], timeout=60
    )
    if derive_key(out / "lmsys-chat-1m", spec, released_root=out / "lmsys-chat-1m-synth") != key:
        raise SystemExit(f"{script} does not print the key of the sample's encrypted files")


def sample_judge_prompts() -> list[dict]:
    """The sample's materials/judge_prompt.jsonl entries, in MT-Bench's llm_judge format (one JSON object
    a line: name, type, system_prompt, prompt_template, description, category, output_format), written
    for this project. single-v1's user turn is our judge prompt (stages/prompts/judge-0to10.txt, the
    text the tiny model learned to judge) with MT-Bench's {question} and {answer}; the other two are
    there so that score picks single-v1 among several."""
    ours = JUDGE_TEMPLATE.read_text(encoding="utf-8").strip().replace("{", "{{").replace("}", "}}")
    single = Template(ours).substitute(question="{question}", answer="{answer}")
    written = "Written for lmsys-chat-1m-synth's bundled sample (scripts/make_sample.py)"
    return [
        {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
         "prompt_template": single, "description": f"Rates one answer from 0 to 10. {written}.",
         "category": "general", "output_format": "[[rating]]"},
        {"name": "pair-v2", "type": "pairwise",
         "system_prompt": "Compare the answers of two AI assistants to the user question below and say which "
         "is better, or that they tie. Reply with [[A]], [[B]] or [[C]] for a tie.",
         "prompt_template": "[User Question]\n{question}\n\n[Assistant A]\n{answer_a}\n\n[Assistant B]\n{answer_b}",
         "description": f"Compares two answers. {written}.", "category": "general", "output_format": "[[A]]"},
        {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
         "prompt_template": "Rate the answer to this math question from 0 to 10 against the reference "
         "answer, as \"Rating: [[k]]\".\n\n[Question]\n{question}\n\n[Reference Answer]\n{ref_answer_1}\n\n"
         "[Answer]\n{answer}", "description": f"Rates one answer against a reference. {written}.",
         "category": "math", "output_format": "[[rating]]"},
    ]  # fmt: skip


def licence_placeholder(name: str, stands_for: str) -> str:
    return (
        f"Placeholder written for lmsys-chat-1m-synth's bundled sample (scripts/make_sample.py).\n\n"
        f"This file is not {stands_for}. The published release (tokyotech-llm/lmsys-chat-1m-synth) ships\n"
        f"that text under the name {name}; a production fetch copies it from there, and package puts it\n"
        "in every release. The demo release carries this placeholder in its place.\n"
    )


def write_materials(out: Path) -> None:
    """The sample's materials/judge_prompt.jsonl and its licence placeholders, under the names the
    published repository uses (conf/source/sample.yaml pins their sha256)."""
    root = out / "lmsys-chat-1m-synth"
    judge = root / JUDGE_PROMPTS
    judge.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(entry, ensure_ascii=False) + "\n" for entry in sample_judge_prompts()]
    judge.write_text("".join(lines), encoding="utf-8", newline="\n")
    for name, stands_for in LICENCES.items():
        (root / name).write_text(licence_placeholder(name, stands_for), encoding="utf-8", newline="\n")


# The published public files (compare@M, generate.source=published): one per release_name with its
# (Japanese responses per instruction, English ones, whether it holds a two-turn continuation).
PUBLISHED_FILE = "dataset/{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"
PUBLISHED_VARIANTS = {"llama3.1": (6, 1, False), "gemma2": (6, 1, True), "gemma3": (10, 0, False)}
PUBLISHED_LACKS = 25  # every 25th released conversation (from the 8th) is not in the published files
PUBLISHED_ONLY = (10, 100, 200)  # where conversations that only the published files hold are inserted
TOKEN_STEPS = (12, 40, 90, 200, 400, 800, 1500, 2500)  # response_token_length: one of each bin, and more
# synthesized_multiturn_conversation as we store it (our shape: docs/assumptions.md 32): a list of one
# conversation, two-turn for this share of the answered instructions (Gemma-2: 134,014 of 451,450),
# spread evenly; the rest single-turn
TWO_TURN_PER_MILLE = 297


def _published_flags(ids: list[str], rows: dict[str, dict], translations: dict[str, str]) -> list[tuple]:
    """(empty, duplicate-of, template) of each id, much as this project's rules give them
    (docs/assumptions.md 21, 12), then changed for some rows, so that the sample's published flags agree
    with this project's on most rows but not all."""
    first: dict[str, str] = {}
    flags = []
    for i, cid in enumerate(ids):
        text = translations.get(cid, f"published-only {cid}")
        turn = rows[cid]["conversation"][0]["content"] if cid in rows else ""
        template = "company introduction" if turn.startswith("Give me an introduction over") else None
        template = "chemical industry article" if turn.startswith("Write an article about the") else template
        duplicate = first.setdefault(text, cid) if text else None
        duplicate = None if duplicate == cid else duplicate
        if i % 9 == 4:
            template = None if template else "company introduction"
        if i % 11 == 5:
            duplicate = None if duplicate else ids[0]
        flags.append((not text if i % 31 != 8 else bool(text), duplicate, template))
    return flags


def _published_responses(name: str, cid: str, i: int, n_ja: int) -> tuple[list[dict], list[dict]]:
    """Up to n_ja project-written responses and their annotations (scores, token lengths, failures)."""
    n = n_ja - (i % 7 == 3) - 2 * (i % 13 == 6)
    responses, notes = [], []
    for j in range(n):
        h = int(hashlib.sha256(f"{name}:{cid}:{j}".encode()).hexdigest(), 16)
        tokens = TOKEN_STEPS[h % len(TOKEN_STEPS)] + h % 10
        score = -1.0 if h % 23 == 0 else float(h % 11)
        text = f"{name} の公開版サンプル回答{j + 1}（会話 {cid[:8]}）：比較テストのために書かれた文章です。"
        responses.append({"role": "assistant", "content": text})
        judgement = None if score < 0 else f"簡潔で役に立つ回答です。評価: [[{int(score)}]]"
        notes.append(
            {"response_token_length": tokens, "judgement": judgement, "repetition_flag": tokens > 2000,
             "preference_score": score}
        )  # fmt: skip
    return responses, notes


def _best(notes: list[dict]) -> int:
    """The response a published conversation continues: the highest preference_score, the first on
    ties (the card: the best response [V]; the tie rule is ours)."""
    return max(range(len(notes)), key=lambda j: (notes[j]["preference_score"], -j))


def published_records(name: str, ids: list[str], rows: dict[str, dict], translations: dict[str, str]):
    """The records of release_name `name`'s published file over the conversations `ids`."""
    n_ja, n_en, two_turn = PUBLISHED_VARIANTS[name]
    answered_before = 0  # answered records so far: which ones are two-turn
    for i, (cid, (empty, duplicate, template)) in enumerate(
        zip(ids, _published_flags(ids, rows, translations), strict=True)
    ):
        answered = not empty and duplicate is None
        responses, notes = _published_responses(name, cid, i, n_ja) if answered else (None, None)
        record = {
            "conversation_id": cid, "duplicate_user_instruction_ja": duplicate,
            "empty_user_instruction_ja": empty, "is_template_instruction": template,
            "synthesized_assistant_responses": responses, "synthesized_response_scoring_annotations": notes,
        }  # fmt: skip
        if n_en:
            english = [{"role": "assistant", "content": f"Published sample answer to {cid[:8]}."}]
            record["synthesized_assistant_responses_en"] = english if answered else None
        if two_turn:
            more = [{"role": "user", "content": "もう少し詳しく教えてください。"},
                    {"role": "assistant", "content": f"{cid[:8]} への続きのサンプル回答です。"}]  # fmt: skip
            second = answered_before * TWO_TURN_PER_MILLE % 1000 < TWO_TURN_PER_MILLE
            record["synthesized_multiturn_conversation"] = (
                [[responses[_best(notes)], *(more if second else [])]] if answered else None
            )
        answered_before += answered
        yield record


def write_published(out: Path, rows: list[dict], translations: dict[str, str], missing: set) -> None:
    """The published public file of each variant, project-written: most released conversations
    (Gemma-3: of the ja+unsafe subset, docs/assumptions.md 2), a few the release lacks, a few only they hold."""
    by_id: dict[str, dict] = {}
    for row in rows:
        by_id.setdefault(row["conversation_id"], row)  # fetch keeps the first of a repeated id
    kept = [c for c in dict.fromkeys(by_id) if c in translations and c not in missing]
    clean = set(_clean(rows, translations))
    for name in PUBLISHED_VARIANTS:
        ids = [c for c in kept if name == "gemma3" or c in clean]
        ids = [c for i, c in enumerate(ids) if i % PUBLISHED_LACKS != 7]
        for k, at in enumerate(PUBLISHED_ONLY):
            ids.insert(at, hashlib.sha256(f"published-only-{k}".encode()).hexdigest()[:32])
        path = out / "lmsys-chat-1m-synth" / PUBLISHED_FILE.format(name=name)
        write_jsonl_gz(published_records(name, ids, by_id, translations), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows, translations, rng = build_rows(args.seed)
    missing = missing_translations(rows, translations)
    shards = hygiene_rows(args.seed, rows, translations, rng)
    source = args.out / "lmsys-chat-1m" / "data"
    source.mkdir(parents=True, exist_ok=True)
    for old in source.glob("*.parquet"):
        old.unlink()
    for s, shard in enumerate(shards):
        table = pa.Table.from_pylist(shard, schema=schema())
        tag = hashlib.sha256(f"{args.seed}-{s}".encode()).hexdigest()[:16]
        path = source / f"train-{s:05d}-of-{N_SHARDS:05d}-{tag}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=64)
    key = derive_key(args.out / "lmsys-chat-1m", KeySpec(file=KEY_FILE))
    write_released(args.out, [r for shard in shards for r in shard], translations, key, missing)
    write_key_script(args.out, key)
    write_materials(args.out)
    write_published(args.out, [r for shard in shards for r in shard], translations, missing)
    total = sum(map(len, shards))
    print(f"wrote {total} conversations in {N_SHARDS} shards and 2 encrypted subsets to {args.out}")


if __name__ == "__main__":
    main()
