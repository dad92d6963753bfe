"""Train data/sample/tiny-chat: a seeded ~1M-parameter Llama-style chat model that behaves like
each of the pipeline's roles, so the demo exercises what the DAG is for.

    python -m scripts.make_tiny_model [--out data/sample/tiny-chat] [--seed 0] [--steps 700]

It is trained for a few minutes on the CPU on synthetic, project-written pairs built below from
the sample's own instruction templates (scripts/make_sample.py), in the real prompt formats
(stages/prompts/*.txt, the chat template below):

- a user turn (Japanese or English) -> a short reply in one of a few styles: mostly relevant
  sentences about the topic, sometimes too short, in the wrong language, repetitive, or a
  question back;
- the judge prompt -> a one-sentence rationale and "Rating: [[k]]", k set by the answer's style
  and length, so ratings vary; an answer that only asks back gets a rationale with no rating
  (the deliberate -1s of the demo);
- the translate prompt -> the Japanese of the sample's English templates;
- the second-turn prompt -> a follow-up question; a two-turn dialogue -> a reply.

Deterministic: one seed drives the data, the initialisation and the batch order; one intra-op
thread whatever the machine; deterministic kernels. Re-running writes byte-identical files on
the same CPU and library versions. It then writes the model's content digest as `revision` in
conf/llm/tiny.yaml (see `write_revision`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import random
import re
import time
from pathlib import Path
from string import Template

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scripts import make_sample as sample

LOG = logging.getLogger("make_tiny_model")
PROMPTS = Path(__file__).resolve().parent.parent / "stages" / "prompts"
LLM_CONF = Path("conf/llm/tiny.yaml")
THREADS = 1  # fixed: the float sums, hence the weights, must not depend on the machine's cores
VOCAB_SIZE = 4096
SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# head_dim = hidden_size / num_attention_heads = 64, as in the production models.
ARCH = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=384,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
BATCH = 32
LR = 3e-3
WARMUP = 40
MIX = {"reply": 0.30, "judge": 0.36, "translate": 0.12, "second_turn": 0.11, "follow_up_reply": 0.11}

KINDS = ["explain", "poem", "myths", "history", "quiz", "teach", "proscons"]  # of sample.INSTRUCTIONS
# Replies. {t}: the topic of the question, in the reply's language.
OPENERS = {
    "ja": {
        "explain": ["{t}をやさしく説明しますね。", "{t}は身近な例で考えるとわかりやすいです。"],
        "poem": ["{t}の短い詩です。", "{t}を詩にしてみました。"],
        "myths": ["{t}についてよくある誤解を三つ挙げます。", "{t}の誤解を順に見ていきます。"],
        "history": ["{t}の歴史を簡単にまとめます。", "{t}の歩みを五つの文で振り返ります。"],
        "quiz": ["{t}のクイズを四問作りました。", "{t}に関するクイズです。"],
        "teach": ["{t}の授業は三つの段階に分けます。", "{t}は実験から始めると伝わりやすいです。"],
        "proscons": ["{t}を学ぶ長所と短所をまとめます。", "{t}を大学で学ぶ利点は多いです。"],
        "code": ["手順を順番に説明します。", "Pythonで書くと次のようになります。"],
        "company": ["{t}は化学品を扱う会社です。", "{t}を紹介します。"],
        "article": ["{t}について記事を書きます。", "{t}は化学業界で重要なテーマです。"],
        "greeting": ["こんにちは！今日はどんなご用件ですか？", "こんにちは。何でも聞いてください。"],
        "unsafe": ["申し訳ありませんが、そのお手伝いはできません。", "それはお手伝いできません。"],
        "personal": ["承知しました。次のように書きます。", "わかりました。文面を用意します。"],
    },
    "en": {
        "explain": ["Here is a simple way to explain {t}.", "{t} is easiest to see with an example."],
        "poem": ["Here is a short poem about {t}.", "A few lines on {t}:"],
        "myths": ["Here are three common myths about {t}.", "Let us look at what people get wrong."],
        "history": ["Here is a short history of {t}.", "The story of {t} starts long ago."],
        "quiz": ["Here is a four-question quiz on {t}.", "Try this quiz on {t}."],
        "teach": ["I would split the class on {t} into three parts.", "Start the class with a demo."],
        "proscons": ["Here are the pros and cons of studying {t}.", "Studying {t} has clear benefits."],
        "code": ["Here are the steps, one by one.", "In Python it looks like this."],
        "company": ["{t} is a chemical company.", "Here is an introduction to {t}."],
        "article": ["Here is an article about {t}.", "{t} matters in the chemical industry."],
        "greeting": ["Hello! How can I help you today?", "Hi! What would you like to know?"],
        "unsafe": ["Sorry, I can't help with that.", "I won't write that, but I can help otherwise."],
        "personal": ["Sure, here is a draft.", "Of course. Here is what I would write."],
    },
}
DETAILS = [  # (English, Japanese): reply sentences, also translation pairs
    ("First, the basics of {t}.", "まず、{t}の基本から始めましょう。"),
    ("There are three key points.", "ポイントは三つあります。"),
    ("Here is one concrete example.", "具体例を一つ挙げます。"),
    ("{t} is useful in many fields.", "{t}は多くの分野で役に立ちます。"),
    ("The key is to link it to everyday life.", "大切なのは、身近な例と結びつけることです。"),
    ("Finally, I sum it up in one sentence.", "最後に、要点を一文でまとめます。"),
    ("Ask me if anything is unclear.", "わからない点があれば気軽に聞いてください。"),
    ("I wrote it for beginners.", "初心者の方にもわかるように書きました。"),
    ("I avoided technical terms.", "専門用語はできるだけ避けました。"),
]
SHORT = {
    "ja": ["はい、わかりました。", "いい質問ですね。", "なるほど。"],
    "en": ["OK.", "Good question.", "Sure."],
}
REPEAT = {"ja": ["はい。", "そうです。", "{t}。"], "en": ["Yes.", "Sure.", "{t}."]}
ASK_BACK = {
    "ja": ["どういう意味ですか？", "もう少し具体的に教えてもらえますか？"],
    "en": ["What do you mean?", "Could you be more specific?"],
}
# A reply's style: (weight, judge rating or None for a rationale without one)
STYLES = {"good": 0.45, "short": 0.17, "wrong_language": 0.14, "repeat": 0.14, "ask_back": 0.10}
RATIONALES = {
    "good": {
        1: ["Relevant, but brief.", "On topic, with little detail."],
        2: ["Relevant and clear.", "A fluent, helpful answer."],
        3: ["Relevant, clear and detailed.", "Helpful and well organised."],
    },
    "short": ["Too short to be helpful.", "It barely answers the question."],
    "wrong_language": ["The answer is not in the language of the question.", "Wrong language."],
    "repeat": ["The answer repeats itself.", "Repetitive and unhelpful."],
    "ask_back": ["The answer asks a question back instead of answering.", "It only asks for clarification."],
    "refusal": ["It rightly declines a harmful request.", "A polite, appropriate refusal."],
}
FOLLOW_UPS = {
    "ja": [
        "もう少し詳しく教えてください。", "具体例をもう一つ挙げてもらえますか？",
        "それを短くまとめてもらえますか？",
        "{t}について、初心者向けの本はありますか？", "ありがとうございます。{t}の歴史も教えてください。",
        "{t}のどこが一番難しいですか？", "子どもにも説明できますか？",
    ],
    "en": [
        "Can you tell me more?", "Could you give another example?", "Can you make it shorter?",
        "Is there a good beginner's book on {t}?", "Thanks! What is the hardest part of {t}?",
    ],
}  # fmt: skip
FOLLOW_UP_OPENERS = {
    "ja": ["もちろんです。", "はい、続けます。", "いい質問ですね。", "わかりました。"],
    "en": ["Of course.", "Sure, here is more.", "Good question.", "Certainly."],
}


def question(rng: random.Random) -> dict:
    """A user turn in English and Japanese, its kind and its topic, from the sample's templates."""
    roll = rng.random()
    if roll < 0.62:
        (topic_en, topic_ja), (en, ja), (ask_en, ask_ja) = (
            rng.choice(sample.TOPICS),
            rng.choice(sample.INSTRUCTIONS),
            rng.choice(sample.STYLES),
        )
        kind = KINDS[sample.INSTRUCTIONS.index((en, ja))]
        return {
            "en": en.format(t=topic_en) + ask_en,
            "ja": ja.format(t=topic_ja) + ask_ja,
            "kind": kind,
            "topic": {"en": topic_en, "ja": topic_ja},
        }
    if roll < 0.72:
        en, ja = rng.choice(sample.CODE_TASKS)
        return {"en": en, "ja": ja, "kind": "code", "topic": {"en": "Python", "ja": "Python"}}
    if roll < 0.80:
        name, place, name_ja, place_ja = rng.choice(sample.COMPANIES)
        en = f"Give me an introduction over 200 words for {name}, a chemical company in {place}"
        ja = f"{place_ja}にある化学会社、{name_ja}について200語以上の紹介文を書いてください。"
        return {"en": en, "ja": ja, "kind": "company", "topic": {"en": name, "ja": name_ja}}
    if roll < 0.86:
        (chem, chem_ja), (what, what_ja) = (
            rng.choice(sample.CHEMICALS),
            rng.choice(sample.ARTICLE_KINDS),
        )
        en = f"Write an article about the {what} of {chem} 2000 words in chemical industry"
        ja = f"化学業界における{chem_ja}の{what_ja}について2000語の記事を書いてください。"
        return {"en": en, "ja": ja, "kind": "article", "topic": {"en": chem, "ja": chem_ja}}
    kind, (en, ja) = rng.choice(
        [("greeting", g) for g in sample.GREETINGS]
        + [("unsafe", u) for u in sample.UNSAFE]
        + [("personal", r) for r in sample.REDACTED]
    )
    return {"en": en, "ja": ja, "kind": kind, "topic": {"en": "it", "ja": "それ"}}


def reply(rng: random.Random, q: dict, lang: str) -> tuple[str, str, int]:
    """A reply to `q` in `lang`: its text, its style and its number of sentences."""
    style = rng.choices(list(STYLES), weights=list(STYLES.values()))[0]
    topic = q["topic"][lang]
    if style == "wrong_language":
        lang, topic = ("en" if lang == "ja" else "ja"), q["topic"]["en" if lang == "ja" else "ja"]
    if style in ("good", "wrong_language"):
        sentences = [rng.choice(OPENERS[lang][q["kind"]])]
        if q["kind"] not in ("greeting", "unsafe"):
            sentences += [d[lang == "ja"] for d in rng.sample(DETAILS, rng.choice([0, 1, 1, 2]))]
    elif style == "short":
        sentences = [rng.choice(SHORT[lang])]
    elif style == "repeat":
        sentences = [rng.choice(REPEAT[lang])] * rng.randint(3, 6)
    else:
        sentences = [rng.choice(ASK_BACK[lang])]
    if style == "good" and q["kind"] == "unsafe":
        style = "refusal"
    joiner = "" if lang == "ja" else " "
    return joiner.join(s.format(t=topic) for s in sentences), style, len(sentences)


def judgement(rng: random.Random, style: str, sentences: int) -> str:
    """The judge's verdict on a reply of `style`: a rationale, then the rating (none for ask_back)."""
    if style == "ask_back":
        return rng.choice(RATIONALES[style])
    if style == "good":
        rating = 5 + sentences + (rng.random() < 0.3)
        return f"{rng.choice(RATIONALES['good'][sentences])} Rating: [[{rating}]]"
    rating = {"short": rng.choice([3, 4]), "wrong_language": 2, "repeat": 1, "refusal": 7}[style]
    return f"{rng.choice(RATIONALES[style])} Rating: [[{rating}]]"


def translated_sentences(rng: random.Random, q: dict) -> tuple[str, str]:
    """One or two reply sentences about q's topic, in English and in Japanese."""
    picked = rng.sample(DETAILS, rng.choice([1, 2]))
    return (
        " ".join(en.format(t=q["topic"]["en"]) for en, _ in picked),
        "".join(ja.format(t=q["topic"]["ja"]) for _, ja in picked),
    )


def truncated(rng: random.Random, text: str) -> str:
    """Most replies whole; some cut as max_tokens cuts them."""
    return text if rng.random() < 0.8 or len(text) < 8 else text[: rng.randint(len(text) // 2, len(text) - 1)]


def prompt(name: str, **fields: str) -> str:
    """stages/prompts/<name>.txt rendered as the stages render it (stages.core.rows.prompts)."""
    return Template((PROMPTS / f"{name}.txt").read_text(encoding="utf-8").strip()).substitute(**fields)


def example(rng: random.Random, task: str) -> tuple[list[dict], str]:
    """One training pair: chat messages and the assistant's target text."""
    q = question(rng)
    lang = "ja" if rng.random() < 0.75 else "en"
    user = [{"role": "user", "content": q[lang]}]
    if task == "reply":
        return user, reply(rng, q, lang)[0]
    if task == "judge":
        text, style, sentences = reply(rng, q, "ja")
        verdict = judgement(rng, style, sentences)
        judge = prompt("judge-0to10", question=q["ja"], answer=truncated(rng, text))
        return [{"role": "user", "content": judge}], verdict
    if task == "translate":
        en, ja = (q["en"], q["ja"]) if rng.random() < 0.8 else translated_sentences(rng, q)
        return [{"role": "user", "content": prompt("translate-ja", text=en)}], ja
    answer = reply(rng, q, lang)[0]
    follow = rng.choice(FOLLOW_UPS[lang]).format(t=q["topic"][lang])
    if task == "second_turn":
        ask = prompt("second-turn-user", question=q[lang], answer=answer)
        return [{"role": "user", "content": ask}], follow
    text = rng.choice(FOLLOW_UP_OPENERS[lang]) + ("" if lang == "ja" else " ")
    text += rng.choice(DETAILS)[lang == "ja"].format(t=q["topic"][lang])
    return [*user, {"role": "assistant", "content": answer}, {"role": "user", "content": follow}], text


def dataset(seed: int, size: int) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    tasks = rng.choices(list(MIX), weights=list(MIX.values()), k=size)
    return [example(rng, task) for task in tasks]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose merges may cross spaces (sentences are not split into words): the fixed
    prompt texts become a few tokens, which keeps the judge's prompts short to train on and to run."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),  # lines and sentences: the prompts' recur
            pre_tokenizers.Split(". ", behavior="merged_with_previous"),  # whole, and are cached whole
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=24,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def encode(tokenizer, pairs: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids ending in <|end|>), the prompt tokenized alone as the engine does."""
    prompts = tokenizer.apply_chat_template([m for m, _ in pairs], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    return [(p, [*t, tokenizer.eos_token_id]) for p, t in zip(prompt_ids, target_ids, strict=True)]


def batch_tensors(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded inputs, their mask, and the flat positions whose next token is a target."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    where, labels = [], []
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        where += [i * width + k for k in range(len(p) - 1, len(seq) - 1)]
        labels += t
    return ids, mask, torch.tensor(where), torch.tensor(labels)


def train(model: LlamaForCausalLM, rows: list, steps: int, pad: int, seed: int) -> None:
    """AdamW with warm-up and cosine decay; the loss only on target tokens (logits only there)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / max(1, steps)))),
    )
    model.train()
    started, running = time.monotonic(), None
    for step in range(steps):
        picked = [rows[order[(step * BATCH + k) % len(rows)]] for k in range(BATCH)]
        ids, mask, where, labels = batch_tensors(picked, pad)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[where])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            LOG.info("step %d/%d: loss %.3f (%.0f s)", step + 1, steps, running, time.monotonic() - started)
    model.eval()


def model_digest(out: Path) -> str:
    """sha256 over the model directory's file names and bytes: what `revision` pins."""
    h = hashlib.sha256()
    for path in sorted(p for p in out.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def write_revision(conf: Path, revision: str) -> None:
    """Pin the local model by its content digest. `revision` is part of the model's identity in
    the response cache and resume keys (recipe(llm)) and of the `translate`/`models` params that
    DVC tracks, so a retrained model reruns the engine stages and never reuses an old answer;
    transformers ignores a revision for a local directory."""
    text = conf.read_text(encoding="utf-8")
    line = f"revision: {revision}  # sha256 of the model's files, written by scripts/make_tiny_model.py"
    new, count = re.subn(r"(?m)^revision:.*$", line, text)
    if count != 1:
        raise SystemExit(f"{conf}: expected one 'revision:' line, found {count}")
    conf.write_text(new, encoding="utf-8")


def build(out: Path, seed: int, steps: int) -> str:
    """Train and save the model and tokenizer into `out`; return its digest. Torch's thread count
    and determinism flag are set for the run and restored after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, seed, steps)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(out: Path, seed: int, steps: int) -> str:
    started = time.monotonic()
    pairs = dataset(seed, steps * BATCH)
    vocab_texts = dataset(seed + 1, 3000)
    tokenizer = train_tokenizer([m[-1]["content"] + "\n" + t for m, t in vocab_texts])
    rows = encode(tokenizer, pairs)
    LOG.info(
        "%d pairs, %.0f tokens each on average (%.0f s)",
        len(rows),
        sum(len(p) + len(t) for p, t in rows) / len(rows),
        time.monotonic() - started,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCH,
    )
    model = LlamaForCausalLM(config)
    train(model, rows, steps, tokenizer.pad_token_id, seed)
    model = model.to(torch.float16)
    model.generation_config.do_sample = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    LOG.info(
        "wrote %s: %s parameters, %.2f MB in %.0f s",
        out,
        f"{model.num_parameters():,}",
        size / 1e6,
        time.monotonic() - started,
    )
    return model_digest(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample/tiny-chat"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=700, help=f"optimizer steps of {BATCH} pairs")
    parser.add_argument("--llm-conf", type=Path, default=LLM_CONF, help="the conf whose revision to pin")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    revision = build(args.out, args.seed, args.steps)
    write_revision(args.llm_conf, revision)
    LOG.info("%s: revision %s", args.llm_conf, revision)


if __name__ == "__main__":
    main()
