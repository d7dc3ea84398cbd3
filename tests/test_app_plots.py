"""workbench.plots: one colour per label everywhere, ratios on log scales centred at 1, every axis titled,
readable second axes, perplexity as ratios, titles clear of the toolbar."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import polars as pl
import pytest

from workbench.plots import PALETTE, colour_map, colour_of, polish, polish_all


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Every analysis' figures on one labelled synthetic run, polished as the dashboard shows them."""
    from workbench.analysis import module
    from workbench.app.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path_factory.mktemp("plots") / "run", n_tokens=3000, n_layers=3, n_experts=8,
                              top_k=2, seq_len=150)
    out = {}
    for name, kw in (("stats", {}), ("super-experts", {}), ("lrc", {"n_boot": 20}), ("multilingual", {}),
                     ("behavior", {"permutations": 50, "bootstrap": 10}), ("atlas", {"max_tokens": 300})):
        res = module(name).analyze(run, progress=False, **kw)
        raw = module(name).figures(res)
        out[name] = (res, {k: go.Figure(f) for k, f in raw.items()}, polish_all(name, raw))
    return out


def test_palette_has_enough_distinct_colours_for_languages_and_experts():
    langs = ["en", "de", "fr", "es", "it", "pt-BR", "nl", "ca", "eu", "pl", "cs", "sl", "da", "el", "tr", "ru", "id",
             "ja", "ko", "zh-CN", "zh-TW"]
    assert len({colour_of(x) for x in langs}) == len(langs)
    experts = [f"E{e}" for e in range(40)]
    assert len({colour_of(x) for x in experts}) == 40
    assert len(set(PALETTE)) == len(PALETTE) >= 40
    assert colour_of("literature") == colour_of("literature") == colour_map(["literature"])["literature"]


def test_a_label_has_the_same_colour_in_every_plot(figures):
    """The atlas' experts and tokens maps (and the multilingual curves) colour one language alike."""
    seen: dict = {}
    for name in ("atlas", "multilingual"):
        for fig in figures[name][2].values():
            if any(t.type == "heatmap" for t in fig.data):
                continue
            for t in fig.data:
                if t.type == "scatter" and t.name in ("en", "de", "fr", "ru", "zh"):
                    seen.setdefault(t.name, set()).add(t.marker.color)
    assert len(seen) >= 3 and all(len(c) == 1 for c in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == len(seen)  # and different labels differ


def test_lift_heatmaps_are_log_ratios_centred_at_one(figures):
    res, raw, polished = figures["stats"]
    names = [n for n in polished if n.startswith("label_")]
    assert names
    for n in names:
        for before, after in zip(raw[n].data, polished[n].data):
            lift = np.asarray(before.z, dtype=float)
            ok = np.isfinite(lift) & (lift > 1 / 64)
            assert np.allclose(np.asarray(after.z, dtype=float)[ok], np.log2(lift[ok]))  # z is log2 of the lift
            assert after.zmid == 0 and after.zmin == -after.zmax  # symmetric: 1/4 as far as 4
            labels = dict(zip(after.colorbar.tickvals, after.colorbar.ticktext))
            assert labels[0] == "1" and labels[1] == "2" and labels[-1] == "1/2"
            assert "log" in after.colorbar.title.text


def test_every_axis_and_colour_bar_has_a_title(figures):
    missing = []
    for name, (_, _, figs) in figures.items():
        for fn, fig in figs.items():
            if not fig.data or all(t.type == "table" for t in fig.data):
                continue
            for axis in ("xaxis", "yaxis"):
                if not (fig.layout[axis].title and fig.layout[axis].title.text):
                    missing.append(f"{name}/{fn} {axis}")
            for t in fig.data:
                if t.type == "heatmap" and not (t.colorbar.title and t.colorbar.title.text):
                    missing.append(f"{name}/{fn} colour bar")
    assert not missing, missing


def test_second_axis_ticks_are_round_and_no_line_runs_above_the_last(figures):
    fig = figures["stats"][2]["load_balance"]
    for axis, ref in (("yaxis", "y"), ("yaxis2", "y2")):
        ax = fig.layout[axis]
        ys = [v for t in fig.data if (t.yaxis or "y") == ref for v in t.y]
        top = ax.range[1]
        steps = top / ax.dtick
        assert ax.tick0 == 0 and math.isclose(steps, round(steps)) and 4 <= round(steps) <= 6  # ticks end at the top
        assert max(ys) <= top and top - ax.dtick < max(ys)  # the top tick is above every point, one step at most
        mantissa = ax.dtick / 10 ** math.floor(math.log10(ax.dtick))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))  # 0.2, 0.25, 0.5, 1 ...: round steps


def test_perplexity_changes_are_drawn_as_ratios_on_a_log_axis():
    from workbench.analysis import AnalysisResult, module

    se = module("super-experts")
    ppl = {"baseline": 9.815, "super_experts": 9.87, "random_0": 9.80}
    experts = pl.DataFrame({"layer": [0, 0], "expert": [0, 1], "max_abs": [3.0, 1.0], "is_super_expert": [True, False]})
    res = AnalysisResult("super-experts", {
        "experts": experts, "super_experts": experts.head(1),
        "prune": pl.DataFrame({"condition": list(ppl), "experts": ["", "L0:E0", "L0:E1"], "ppl": list(ppl.values())}),
        "sink_decay": pl.DataFrame(schema={"condition": pl.Utf8, "layer": pl.Int16, "d_sink": pl.Float64})}, "experts")
    fig = polish(se.figures(res)["prune_ppl"], "super-experts", "prune_ppl")
    bar = fig.data[0]
    assert fig.layout.yaxis.type == "log" and bar.base == 1
    for x, y in zip(bar.x, bar.y):  # the bar runs from 1 to perplexity / baseline
        assert math.isclose(1 + y, ppl[x] / ppl["baseline"])
    lo, hi = fig.layout.yaxis.range
    assert math.isclose(-lo, hi) and 10 ** hi > 9.87 / 9.815  # centred at 1 and the change is inside


def test_super_expert_rings_have_a_dark_outline_under_a_bright_one(figures):
    fig = figures["super-experts"][2]["expert_max_heatmap"]
    rings = [t for t in fig.data if t.type == "scatter"]
    if not rings:
        pytest.skip("the synthetic run has no super expert")
    assert rings[-1].name == "super expert" and rings[-1].marker.size >= 14  # drawn last: on top
    assert any(t.marker.color == "black" and t.marker.size > rings[-1].marker.size for t in rings[:-1])


def test_titles_sit_below_the_toolbar_band(figures):
    for name, (_, _, figs) in figures.items():
        for fn, fig in figs.items():
            if fig.layout.title and fig.layout.title.text:
                assert fig.layout.margin.t >= 80 and fig.layout.title.yref == "paper"
                assert fig.layout.title.yanchor == "bottom", f"{name}/{fn}"


def test_locality_plots_use_percent_like_its_summary(figures):
    res, _, figs = figures["lrc"]
    assert "SRP" in res.summary
    assert figs["srp_vs_m"].layout.yaxis.tickformat == ".0%"
