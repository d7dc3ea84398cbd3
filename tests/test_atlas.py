"""Expert atlas: profiles by hand, planted expert groups separate, seeded determinism."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from workbench.analysis import atlas
from workbench.errors import WorkbenchError
from test_multilingual import write_run as ml_write_run


def write_run(path, docs, layers, n_experts, top_k):
    """docs: list of (class, [(token, {layer: (experts, weights)})])."""
    docs = [({"class": cls, "key": str(d)}, toks) for d, (cls, toks) in enumerate(docs)]
    return ml_write_run(path, docs, layers, n_experts, top_k, labels=("class", "key"))


E, LAYERS = 8, (0, 1, 2)
GROUP = {"a": (0, 1, 2, 3), "b": (4, 5, 6, 7)}  # class a tokens only use experts 0-3, class b 4-7


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = []
    for cls, letters in (("a", "abcdef"), ("b", "uvwxyz")):
        for _ in range(30):
            toks = []
            for _ in range(12):
                routes = {}
                for layer in LAYERS:
                    ex = rng.choice(GROUP[cls], 2, replace=False)
                    w = rng.dirichlet([1, 1])
                    routes[layer] = (tuple(int(e) for e in ex), tuple(float(v) for v in w))
                toks.append((str(rng.choice(list(letters))), routes))
            docs.append((cls, toks))
    return write_run(tmp_path_factory.mktemp("atlas") / "run", docs, LAYERS, E, 2)


def test_profiles_by_hand(tmp_path):
    # one layer, E=3, K=1: tokens x(a) -> e0, y(a) -> e0, x(b) -> e1
    docs = [("a", [("x", {0: ((0,), (1.0,))}), ("y", {0: ((0,), (1.0,))})]), ("b", [("x", {0: ((1,), (1.0,))})])]
    run = write_run(tmp_path / "r", docs, [0], 3, 1)
    index, blocks = atlas.expert_profiles(run, labels=["class"], top_tokens=10)
    assert index["n_selections"].to_list() == [2, 1, 0]
    values, counts = blocks["class"]
    assert values == ["a", "b"]
    np.testing.assert_array_equal(counts, [[2, 0], [0, 1], [0, 0]])
    tvalues, tcounts = blocks["token"]
    assert tvalues == ["x", "y", "<other>"]  # x is the most frequent token
    np.testing.assert_array_equal(tcounts, [[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token vectors: renormalised weights in the layer's E block
    from workbench.analysis.common import routing_arrays

    ra = routing_arrays(run)
    np.testing.assert_array_equal(atlas.token_vectors(ra), [[1, 0, 0], [1, 0, 0], [0, 1, 0]])


def test_token_vectors_renormalise(tmp_path):
    docs = [("a", [("x", {0: ((2, 0), (0.3, 0.1)), 1: ((1, 2), (0.5, 0.5))})])]
    run = write_run(tmp_path / "r", docs, [0, 1], 3, 2)
    from workbench.analysis.common import routing_arrays

    v = atlas.token_vectors(routing_arrays(run))
    np.testing.assert_allclose(v, [[0.25, 0, 0.75, 0, 0.5, 0.5]])


def _separation(xy: np.ndarray, group: np.ndarray) -> float:
    """Share of points whose nearest other point is in the same group."""
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((group[d.argmin(1)] == group).mean())


def test_planted_groups_separate_and_labels(planted):
    res = atlas.analyze(planted, seed=1)
    ex = res.tables["experts"]
    assert res.meta["labels"] == ["class"]  # key has one value per doc: too many to colour by
    assert ex.height == len(LAYERS) * E and set(ex["method"]) == {"umap"}
    group = np.where(ex["expert"].to_numpy() < 4, 0, 1)
    assert _separation(ex.select("x", "y").to_numpy(), group) == 1.0
    # the dominant class of each expert is its planted class, exclusively
    assert ex["top_class"].to_list() == ["a" if g == 0 else "b" for g in group]
    assert ex["top_class_share"].min() == 1.0
    assert ex["top_class_lift"].to_numpy() == pytest.approx(2.0)
    # over-represented tokens are the class's letters
    row = ex.filter((pl.col("layer") == 0) & (pl.col("expert") == 5))["top_tokens"][0]
    assert row and all(ch in "uvwxyz" for ch in row.replace("'", "").replace(" ", ""))
    tk = res.tables["tokens"]
    assert tk.height == 60 * 12
    assert _separation(tk.select("x", "y").to_numpy(), (tk["class"] == "a").to_numpy()) > 0.99


def test_seeded_and_sampled(planted):
    a = atlas.token_atlas(planted, max_tokens=200, seed=3)
    b = atlas.token_atlas(planted, max_tokens=200, seed=3)
    assert a.height == 200
    assert a.equals(b)
    c = atlas.token_atlas(planted, max_tokens=200, seed=4)
    assert not a.select("doc_id", "pos").equals(c.select("doc_id", "pos"))


def test_small_inputs_use_pca_and_errors(tmp_path, planted):
    coords, method = atlas.embed(np.eye(4))
    assert method == "pca" and coords.shape == (4, 2)
    # PCA keeps distances of points lying in a plane
    pts = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0]], float)
    c, _ = atlas.embed(pts)
    assert np.linalg.norm(c[1] - c[2]) == pytest.approx(5.0)
    with pytest.raises(WorkbenchError, match="label column"):
        atlas.analyze(planted, labels=["lang"])
    with pytest.raises(WorkbenchError, match="--what"):
        atlas.analyze(planted, what=["maps"])


def test_figures_and_cli(planted, tmp_path, capsys):
    from workbench.cli import main

    res = atlas.analyze(planted, what="experts")
    figs = atlas.figures(res)
    assert set(figs) == {"experts"}
    assert sum(len(t.x) for t in figs["experts"].data) == len(LAYERS) * E
    out = tmp_path / "atlas.csv"
    assert main(["analyze", "atlas", str(planted.path), "--out", str(out), "--what", "experts,tokens",
                 "--max-tokens", "100", "--figures", str(tmp_path / "f")]) == 0
    assert pl.read_csv(out).height == len(LAYERS) * E
    assert (tmp_path / "f" / "tokens.html").exists()
    assert main(["analyze", "atlas", str(planted.path), "--labels", "nope"]) == 2
