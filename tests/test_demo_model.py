"""The bundled demo model: size limits, offline loading, routing captured by the workbench, and that it
is really trained (low loss on held-out text, language-dependent routing). Plus evaluate/train helpers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.models.loading import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]  # recipes/ (the demo model's recipe) lives in the checkout, not the package
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

MiB = 1 << 20


def test_files_within_limits():
    shards = sorted(DEMO_MODEL_DIR.glob("*.safetensors"))
    assert len(shards) >= 2
    assert all(f.stat().st_size <= 15 * MiB for f in shards)
    assert sum(f.stat().st_size for f in shards) <= 48 * MiB
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["dtype"] in ("bfloat16", "float16")
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    assert cfg["num_hidden_layers"] >= 6 and n_exp >= 32 and cfg["num_experts_per_tok"] >= 2
    index = json.loads((DEMO_MODEL_DIR / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}


@pytest.fixture(scope="module")
def demo():
    from workbench.models.loading import load_model

    return load_model("demo")


def test_plain_transformers_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert model.config.vocab_size == len(tok)
    text = "Gruß, 世界! مرحبا — def f(x): return 2**x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_load_model_demo_is_fp32_eval(demo):
    assert next(demo.model.parameters()).dtype == torch.float32
    assert not demo.model.training
    assert demo.moe_layers == list(range(demo.n_layers)) and demo.n_experts >= 32 and demo.top_k >= 2


def test_capture_routes_like_the_router(demo, tmp_path):
    """Captured experts equal the top-k of the router's logits recomputed from its input and weight."""
    import workbench as wb

    lines = ["The table is inserted at the cursor.", "def add(a, b):\n    return a + b", "Wählen Sie Format - Zellen."]
    run = wb.capture(demo, lines, tmp_path / "run", probes=["routing"], progress=False)
    rt = run.routing.collect().sort("doc_id", "pos", "layer")
    ntok = sum(len(demo.tokenize(t)) for t in lines)
    assert rt.height == ntok * demo.n_layers
    for layer in (0, demo.n_layers - 1):
        router = demo.layer(layer).router
        seen = {}
        h = router.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
        try:
            for doc, text in enumerate(lines):
                with torch.no_grad():
                    demo.model(input_ids=torch.tensor([demo.tokenize(text)]))
                logits = seen["x"].reshape(-1, seen["x"].shape[-1]) @ router.weight.T
                want = torch.topk(logits, demo.top_k, dim=-1).indices.sort(-1).values
                got = rt.filter((rt["doc_id"] == doc) & (rt["layer"] == layer))
                got_idx = torch.tensor([sorted(e) for e in got["experts"].to_list()])
                assert got_idx.min() >= 0 and got_idx.max() < demo.n_experts
                assert torch.equal(got_idx, want)
                w = np.array(got["weights"].to_list())
                assert np.allclose(w.sum(1), 1.0, atol=1e-4)  # norm_topk_prob
        finally:
            h.remove()


def test_trained_much_better_than_unigram_on_heldout(demo):
    """Held-out calibration text: the model's loss is far below log(V) and below a shuffled-token copy."""
    recs = [json.loads(l) for l in (Path(__file__).parents[1] / "datasets" / "calibration.jsonl").open()]
    tok = demo.tokenizer
    for domain in ("technical", "code", "maths"):
        text = next(r["text"] for r in recs if r["domain"] == domain)
        ids = torch.tensor([[tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:256]])
        perm = torch.cat([ids[:, :1], ids[:, 1:][:, torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))]], 1)
        with torch.no_grad():
            loss = demo.model(input_ids=ids, labels=ids).loss.item()
            shuffled = demo.model(input_ids=perm, labels=perm).loss.item()
        assert loss < 0.45 * math.log(demo.model.config.vocab_size), (domain, loss)
        assert loss < shuffled - 1.0, (domain, loss, shuffled)


def test_routing_depends_on_language(demo):
    """Layer-0 expert distributions of English vs Japanese vs Russian paragraphs differ far more than the
    same paragraphs with language labels shuffled."""
    from recipes.demo_model.evaluate import _jsd

    recs = [json.loads(l) for l in (Path(__file__).parents[1] / "datasets" / "multilingual.jsonl").open()]
    keys = list(dict.fromkeys(r["key"] for r in recs))[:8]
    sel = [r for r in recs if r["key"] in keys and r["lang"] in ("en", "ja", "ru")]
    counts, labels = [], []
    router = demo.layer(0).router
    got = {}
    h = router.register_forward_hook(lambda m, a, out: got.__setitem__("i", out[2]))
    try:
        for r in sel:
            ids = torch.tensor([demo.tokenize(r["text"])])
            with torch.no_grad():
                demo.model(input_ids=ids)
            counts.append(np.bincount(got["i"].reshape(-1).numpy(), minlength=demo.n_experts))
            labels.append(r["lang"])
    finally:
        h.remove()
    counts, labels = np.array(counts), np.array(labels)

    def stat(lab):
        d = [counts[lab == l].sum(0) / counts[lab == l].sum() for l in ("en", "ja", "ru")]
        return np.mean([_jsd(d[0], d[1]), _jsd(d[0], d[2]), _jsd(d[1], d[2])])

    rng = np.random.default_rng(0)
    null = [stat(rng.permutation(labels)) for _ in range(20)]
    assert stat(labels) > 3 * max(null)


# ------------------------------------------------------------------------------- helpers, by hand

def test_jsd_matches_scipy():
    from scipy.spatial.distance import jensenshannon

    from recipes.demo_model.evaluate import _jsd

    rng = np.random.default_rng(1)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(16)), rng.dirichlet(np.ones(16))
        p[rng.integers(16)] = 0
        p /= p.sum()
        assert math.isclose(_jsd(p, q), jensenshannon(p, q) ** 2, rel_tol=1e-9)


def test_language_routing_separates_disjoint_experts():
    from recipes.demo_model.evaluate import language_routing

    rng = np.random.default_rng(0)
    langs, keys, counts = [], [], []
    for k in range(20):
        for li, lang in enumerate(["a", "b", "c"]):
            c = np.zeros((2, 12), np.int64)
            c[0, li * 4:(li + 1) * 4] = rng.integers(1, 10, 4)  # layer 0: each language has its experts
            c[1] = rng.integers(1, 10, 12)  # layer 1: same distribution for all
            counts.append(c)
            langs.append(lang)
            keys.append(f"k{k}")
    rows = language_routing(np.array(counts), langs, keys, n_shuffles=10)
    assert rows[0]["lang_id_accuracy"] == 1.0 and rows[0]["ratio"] > 10
    assert rows[1]["ratio"] < 2.5 and rows[1]["lang_id_accuracy"] < 0.8


def test_load_table_by_hand():
    from recipes.demo_model.evaluate import load_table

    c = np.zeros((1, 1, 4), np.int64)
    c[0, 0] = [2, 2, 0, 0]
    row = load_table(c)[0]
    assert row["dead_experts"] == 2 and row["max_share_x_uniform"] == 2.0
    assert math.isclose(row["norm_entropy"], math.log(2) / math.log(4), rel_tol=1e-3)


def test_lr_schedule_by_hand():
    from recipes.demo_model.train import lr_at

    assert lr_at(0.0, 1.0, 0.1) == 0.0
    assert math.isclose(lr_at(0.05, 1.0, 0.1), 0.5)
    assert math.isclose(lr_at(0.1, 1.0, 0.1), 1.0)
    assert math.isclose(lr_at(0.55, 1.0, 0.1, floor=0.1), 0.55)  # half-way down the cosine
    assert math.isclose(lr_at(1.0, 1.0, 0.1, floor=0.1), 0.1)
