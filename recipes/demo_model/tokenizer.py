"""Train the demo model's byte-level BPE tokenizer on the corpus and pre-tokenize the corpus.

    .venv/bin/python -m recipes.demo_model.tokenizer --corpus .device_carry/demo/corpus.jsonl.xz \
        --out workbench/assets/demo_model --tokens .device_carry/demo

Digits are split one by one (the corpus has generated arithmetic); every byte is in the alphabet, so
any text in any script encodes without unknown tokens. Saved so `AutoTokenizer` loads it offline.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB = 12288
VAL_FRACTION = 0.005
SEED = 4321


def read_corpus(path: str | Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts, vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_for_transformers(tok, out: str | Path):
    """tokenizer.json + tokenizer_config.json that AutoTokenizer reads without a hub."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=2048,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    return fast


def pretokenize(tok, docs: list[dict], out: Path) -> dict:
    """uint16 token streams (documents joined by EOS): train and a small validation split, xz-compressed."""
    eos = tok.token_to_id(EOS)
    r = random.Random(SEED)
    is_val = [r.random() < VAL_FRACTION for _ in docs]
    enc = tok.encode_batch([d["text"] for d in docs])
    streams = {"train": [], "val": []}
    for d, e, v in zip(docs, enc, is_val):
        streams["val" if v else "train"].append(np.asarray(e.ids + [eos], np.uint16))
    stats = {}
    for name, parts in streams.items():
        arr = np.concatenate(parts)
        with lzma.open(out / f"tokens_{name}.u16.xz", "wb", preset=6) as f:
            f.write(arr.tobytes())
        stats[name] = int(arr.size)
    by_domain: dict[str, list[int]] = {}
    for d, e in zip(docs, enc):
        s = by_domain.setdefault(d["domain"], [0, 0])
        s[0] += len(d["text"].encode())
        s[1] += len(e.ids)
    stats["bytes_per_token"] = {k: round(b / max(t, 1), 3) for k, (b, t) in by_domain.items()}
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer and pre-tokenize the corpus.")
    ap.add_argument("--corpus", default=".device_carry/demo/corpus.jsonl.xz")
    ap.add_argument("--out", default="workbench/assets/demo_model")
    ap.add_argument("--tokens", default=".device_carry/demo", help="folder for the pre-tokenized streams")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    args = ap.parse_args(argv)
    docs = read_corpus(args.corpus)
    tok = train_tokenizer([d["text"] for d in docs], args.vocab)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_for_transformers(tok, args.out)
    stats = pretokenize(tok, docs, Path(args.tokens))
    (Path(args.tokens) / "tokens_meta.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
