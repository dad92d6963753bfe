"""Write data/sample/tiny-chat: a seeded, randomly initialised Llama-style chat model (~0.6 MB)
with a byte-level BPE tokenizer trained on the sample's text and a chat template.

    python scripts/make_tiny_model.py [--out data/sample/tiny-chat] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SOURCE = Path("data/sample/lmsys-chat-1m/data")
PROMPTS = Path("stages/prompts")
VOCAB_SIZE = 512
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
    intermediate_size=256,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def corpus() -> list[str]:
    table = pq.read_table(SOURCE, columns=["conversation"]).to_pylist()
    texts = [m["content"] for row in table for m in row["conversation"]]
    return texts + [p.read_text(encoding="utf-8") for p in sorted(PROMPTS.glob("*.txt"))]


def train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample/tiny-chat"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = train_tokenizer()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCH,
    )
    model = LlamaForCausalLM(config).to(torch.float16)
    model.generation_config.do_sample = True
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out}: {model.num_parameters():,} parameters, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
