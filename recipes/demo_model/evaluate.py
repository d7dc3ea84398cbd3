"""Measure the demo model on CPU: held-out perplexity, expert load balance, language-dependent routing.

    .venv/bin/python -m recipes.demo_model.evaluate --out benchmarks/results/demo_model_eval.json

All evaluation text is held out from training (datasets/build/heldout_keys.txt, corpus.py):
- perplexity per language on `multilingual` (21 languages x the first 200 of its 400 keys) and per domain on
  `calibration`, against a unigram model fitted on the training token stream (add-one smoothed); both
  predict exactly the same tokens (each record after an EOS, as documents were joined in training).
  Bits per UTF-8 byte are given too, since tokens per byte differ across scripts.
- expert load per layer: token share of each expert on all evaluation tokens; normalised entropy
  H/log(E), the busiest expert's share relative to uniform, dead experts (never selected).
- language dependence: per layer, the mean pairwise Jensen-Shannon divergence between languages'
  expert-selection distributions, against the same statistic after shuffling language labels across
  paragraphs (permutation baseline, mean and max over 20 shuffles); and the accuracy of naming a
  paragraph's language from its routing histogram (nearest centroid, centroids from every other key, tested
  on the rest; chance 1/21). Records are cut at 256 tokens (2 CPU cores: about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from workbench.models.hooks import RouterOut

ROOT = Path(__file__).resolve().parents[2]


def _jsd(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def unigram_logprobs(train_stream: Path, vocab: int) -> np.ndarray:
    with lzma.open(train_stream, "rb") as f:
        ids = np.frombuffer(f.read(), dtype=np.uint16)
    counts = np.bincount(ids, minlength=vocab).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


@torch.no_grad()
def run_records(mm, texts: list[str], max_len: int = 512, batch_tokens: int = 4096, progress: bool = True):
    """Per record: token NLLs (model), target ids, and expert counts [L, E] over its tokens."""
    from tqdm import tqdm

    tok, model = mm.tokenizer, mm.model
    eos = tok.eos_token_id
    enc = [[eos] + tok(t, add_special_tokens=False)["input_ids"][: max_len - 1] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    L, E = len(mm.layers), mm.n_experts
    nll: list = [None] * len(enc)
    counts = np.zeros((len(enc), L, E), np.int32)
    captured: dict[int, torch.Tensor] = {}
    hooks = mm.hooks({f"L{layer.index}.router": lambda m, a, out, j=j: captured.__setitem__(j, RouterOut.of(out).index)
                      for j, layer in enumerate(mm.layers)})
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(enc[i]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    try:
        for b in tqdm(batches, desc="evaluate", disable=not progress):
            T = max(len(enc[i]) for i in b)
            ids = torch.full((len(b), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(b), T), dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, : len(enc[i])] = torch.tensor(enc[i])
                mask[r, : len(enc[i])] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            for j in range(L):
                sel = captured[j].view(len(b), T, -1)
                for r, i in enumerate(b):
                    n = len(enc[i])
                    counts[i, j] = np.bincount(sel[r, 1:n].reshape(-1).numpy(), minlength=E)
            for r, i in enumerate(b):
                n = len(enc[i])
                nll[i] = (-lp[r, : n - 1]).numpy()
    finally:
        hooks.remove()
    targets = [np.asarray(e[1:]) for e in enc]
    return nll, targets, counts


def ppl_table(groups: dict[str, list[int]], nbytes_of, nll, targets, uni) -> list[dict]:
    """nbytes_of[i]: UTF-8 bytes of record i's predicted tokens (records may be cut to max_len)."""
    rows = []
    for g, idx in groups.items():
        m = np.concatenate([nll[i] for i in idx])
        u = np.concatenate([-uni[targets[i]] for i in idx])
        nbytes = sum(nbytes_of[i] for i in idx)
        rows.append({"group": g, "records": len(idx), "tokens": int(m.size), "bytes_per_token": round(nbytes / m.size, 3),
                     "ppl": round(float(np.exp(m.mean())), 2), "unigram_ppl": round(float(np.exp(u.mean())), 1),
                     "bits_per_byte": round(float(m.sum() / math.log(2) / nbytes), 3),
                     "unigram_bits_per_byte": round(float(u.sum() / math.log(2) / nbytes), 3)})
    return rows


def load_table(counts: np.ndarray) -> list[dict]:
    tot = counts.sum(0)  # [L, E]
    rows = []
    for l, c in enumerate(tot):
        p = c / c.sum()
        nz = p[p > 0]
        rows.append({"layer": l, "norm_entropy": round(float(-(nz * np.log(nz)).sum() / math.log(len(p))), 4),
                     "max_share_x_uniform": round(float(p.max() * len(p)), 2),
                     "min_share_x_uniform": round(float(p.min() * len(p)), 3),
                     "dead_experts": int((c == 0).sum())})
    return rows


def language_routing(counts: np.ndarray, langs: list[str], keys: list[str], n_shuffles: int = 20,
                     seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    L = counts.shape[1]
    lang_names = sorted(set(langs))
    lab = np.array([lang_names.index(l) for l in langs])
    key_names = sorted(set(keys))
    kid = np.array([key_names.index(k) for k in keys])
    train_keys = set(range(0, len(key_names), 2))
    is_train = np.array([k in train_keys for k in kid])

    def mean_pair_jsd(c, labels, layer):
        dists = []
        for g in range(len(lang_names)):
            s = c[labels == g, layer].sum(0).astype(np.float64)
            dists.append(s / s.sum())
        vals = [_jsd(dists[a], dists[b]) for a in range(len(dists)) for b in range(a + 1, len(dists))]
        return float(np.mean(vals))

    rows = []
    for layer in range(L):
        obs = mean_pair_jsd(counts, lab, layer)
        null = [mean_pair_jsd(counts, rng.permutation(lab), layer) for _ in range(n_shuffles)]
        # nearest-centroid language identification from the routing histogram (cosine on shares)
        h = counts[:, layer].astype(np.float64)
        h /= h.sum(1, keepdims=True)
        cent = np.stack([h[(lab == g) & is_train].mean(0) for g in range(len(lang_names))])
        hn = h / np.linalg.norm(h, axis=1, keepdims=True)
        cn = cent / np.linalg.norm(cent, axis=1, keepdims=True)
        pred = (hn[~is_train] @ cn.T).argmax(1)
        rows.append({"layer": layer, "mean_pairwise_jsd": round(obs, 4), "shuffled_jsd_mean": round(float(np.mean(null)), 4),
                     "shuffled_jsd_max": round(float(np.max(null)), 4), "ratio": round(obs / float(np.mean(null)), 1),
                     "lang_id_accuracy": round(float((pred == lab[~is_train]).mean()), 3),
                     "chance": round(1 / len(lang_names), 3)})
    return rows


def read_jsonl(name: str) -> list[dict]:
    with open(ROOT / "datasets" / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate the demo model on CPU.")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--train-stream", default=".device_carry/demo/tokens_train.u16.xz",
                    help="pre-tokenized training stream (for the unigram baseline)")
    ap.add_argument("--out", default="benchmarks/results/demo_model_eval.json")
    ap.add_argument("--keys", type=int, default=200, help="multilingual keys to use (<= 400)")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per record (calibration documents are cut)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from workbench.models.loading import load_model

    t0 = time.time()
    mm = load_model(args.model)
    uni = unigram_logprobs(Path(args.train_stream), mm.model.config.vocab_size)
    multi = read_jsonl("multilingual")
    keep = list(dict.fromkeys(r["key"] for r in multi))[: args.keys]
    multi = [r for r in multi if r["key"] in set(keep)]
    cal = read_jsonl("calibration")
    recs = multi + cal
    texts = [r["text"] for r in recs]
    nll, targets, counts = run_records(mm, texts, max_len=args.max_len)
    nm = len(multi)
    nbytes_of = [len(mm.tokenizer.decode(t.tolist()).encode()) for t in targets]
    by_lang: dict[str, list[int]] = {}
    for i, r in enumerate(multi):
        by_lang.setdefault(r["lang"], []).append(i)
    by_dom: dict[str, list[int]] = {}
    for i, r in enumerate(cal):
        by_dom.setdefault(r["domain"], []).append(nm + i)
    result = {
        "model": mm.describe() | {"file_hashes": mm.file_hashes},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "perplexity_by_language": ppl_table(by_lang, nbytes_of, nll, targets, uni),
        "perplexity_by_domain": ppl_table(by_dom, nbytes_of, nll, targets, uni),
        "expert_load": load_table(counts),
        "language_routing": language_routing(counts[:nm], [r["lang"] for r in multi], [r["key"] for r in multi]),
        "settings": {"multilingual_keys": len(keep), "max_len": args.max_len,
                     "unigram": "training stream token counts + 1"},
        "eval_seconds": round(time.time() - t0, 1),
    }
    import transformers

    result["machine"]["transformers"] = transformers.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    for k in ("perplexity_by_language", "perplexity_by_domain", "expert_load", "language_routing"):
        print(k)
        for row in result[k]:
            print("  ", row)


if __name__ == "__main__":
    main()
