"""`workbench demo`: the main job, offline. Bundled model + datasets -> runs -> every analysis -> report -> app.

Completed captures are reused (a run folder whose manifest says complete for the same model, data
and settings is not redone), so a second `workbench demo` goes straight to the analyses.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunMismatch, WorkbenchError


@dataclass
class RunPlan:
    name: str
    dataset: str
    probes: tuple[str, ...] = ("routing",)
    logits: bool = False
    seq_len: int | None = None
    where: dict | None = None
    first_keys: int | None = None
    limit: int | None = None
    max_tokens: int | None = None
    interleave: str | None = None


@dataclass
class AnalysisPlan:
    analysis: str
    run: str
    options: dict = field(default_factory=dict)
    title: str = ""  # default: the analysis' title in workbench.analysis.registry

    @property
    def heading(self) -> str:
        from .analysis.registry import ANALYSES

        return self.title or ANALYSES[self.analysis].title or self.analysis
    model: bool = False  # pass the loaded model (closed-loop analyses) instead of reloading it


def plans(quick: bool) -> tuple[list[RunPlan], list[AnalysisPlan]]:
    """What the demo captures and analyses; `quick` shrinks every capture for CI and a first look."""
    runs = [
        RunPlan("calibration", "calibration", probes=("routing", "experts", "hidden", "attention"), logits=True,
                seq_len=256, max_tokens=8192 if quick else 49152, interleave="domain"),
        RunPlan("multilingual", "multilingual", first_keys=6 if quick else 30),
        RunPlan("behavior", "behavior", where={"set": ["refusal"]}, limit=80 if quick else 400),
        RunPlan("code", "behavior", where={"set": ["code"]}, limit=80 if quick else 320),
    ]
    analyses = [
        AnalysisPlan("stats", "calibration"),
        AnalysisPlan("super-experts", "calibration", title="Super experts: profile, prune, perplexity",
                     options={"prune": not quick, "prune_max_tokens": 4096, "n_random": 2}, model=True),
        AnalysisPlan("lrc", "calibration"),
        AnalysisPlan("multilingual", "multilingual"),
        AnalysisPlan("behavior", "behavior", title="fTRI behaviour map: refusal vs benign requests"),
        AnalysisPlan("behavior", "code", title="fTRI behaviour map: code vs prose, closed loop",
                     options={"intervene": 0 if quick else 8, "score": "text", "seeds": 2, "max_heldout": 24},
                     model=True),
        AnalysisPlan("atlas", "calibration"),
    ]
    return runs, analyses


def _model(out: Path):
    from .models.loading import DEMO_MODEL_DIR, load_model

    if (DEMO_MODEL_DIR / "config.json").exists():
        return load_model("demo"), None
    from .models.tiny import make_tiny

    tiny = out / "tiny_model"
    if not (tiny / "config.json").exists():
        make_tiny("qwen3_moe", tiny, layers=6, experts=16, top_k=4, hidden=64)
    note = "The bundled demo model is missing from this install; this report uses a tiny random qwen3_moe."
    return load_model(str(tiny)), note


def run_demo(out: str | Path = "demo_out", serve: bool = True, port: int = 8050, quick: bool = False) -> Path:
    from . import analysis as an
    from .analysis.persist import cached
    from .capture import capture
    from .data import load_dataset, subset
    from .report import Section, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mm, note = _model(out)
    print(f"[demo] model: {mm.spec} ({mm.model.config.model_type}, {mm.n_layers} layers, {mm.n_experts} experts, "
          f"top-{mm.top_k})")
    run_plans, analysis_plans = plans(quick)
    runs, data = {}, {}
    for rp in run_plans:
        ds = data[rp.name] = load_dataset(rp.dataset)
        if rp.where or rp.first_keys or rp.limit or rp.interleave:
            ds = data[rp.name] = subset(ds, where=rp.where, first_keys=rp.first_keys, limit=rp.limit,
                                        interleave=rp.interleave)
        print(f"[demo] capture {rp.name}: {ds.name}, {len(ds.records)} records, probes {','.join(rp.probes)}")
        path = out / "runs" / (rp.name + ("-quick" if quick else ""))
        kw = dict(probes=rp.probes, logits=rp.logits, seq_len=rp.seq_len, max_tokens=rp.max_tokens, batch_size=8)
        try:
            runs[rp.name] = capture(mm, ds, path, resume=True, **kw)
        except RunMismatch:  # the demo's plan changed (a newer workbench): the demo folder is ours to redo
            print(f"[demo]   {path} holds an older demo capture; capturing again")
            runs[rp.name] = capture(mm, ds, path, overwrite=True, **kw)
    sections = [Section("Model and runs", summary=_overview(mm, runs), note=note or "")]
    tables_dir = out / "tables"
    for ap in analysis_plans:
        print(f"[demo] analyze {ap.analysis} on {ap.run}")
        t = time.time()
        try:
            mod = an.module(ap.analysis)
            # computed once, stored in the run folder: a second demo (and the app) reuse it
            opts = {**ap.options, **({"model": mm} if ap.model else {})}
            key = {**ap.options, "model": runs[ap.run].model_info.get("spec")} if ap.model else None
            result = cached(ap.analysis, runs[ap.run], lambda _m=mod, _r=runs[ap.run], **o: _m.analyze(_r, **o),
                            opts, key=key)
            figs = mod.figures(result)
            an.write_table(result.table, tables_dir / f"{ap.analysis}-{ap.run}.parquet")
            sections.append(Section(ap.heading, summary=result.summary, figures=figs,
                                    tables=dict(list(result.tables.items())[:4])))
            print(f"[demo]   done in {time.time() - t:.1f}s")
        except WorkbenchError as e:
            sections.append(Section(ap.heading, note=f"skipped: {e}"))
            print(f"[demo]   skipped: {e}")
        except Exception as e:  # one broken analysis must not cost the user the whole report
            sections.append(Section(ap.heading, note=f"failed: {type(e).__name__}: {e}"))
            print(f"[demo]   FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    if "code" in runs:  # compare: the same code/prose prompts with the top-8 code experts banned
        print("[demo] compare code prompts: as is vs top-8 code experts banned")
        try:
            from .analysis import compare as cmp

            path = out / "runs" / ("code-banned" + ("-quick" if quick else ""))
            runs["code-banned"], result, banned = cmp.demo_comparison(mm, runs["code"], data["code"], path)
            an.write_table(result.table, tables_dir / "compare-code-banned.parquet")
            sections.append(Section("Comparison: code prompts with the top-8 code experts banned",
                                    summary=result.summary, figures=cmp.figures(result),
                                    tables=dict(list(result.tables.items())[:4])))
        except WorkbenchError as e:
            sections.append(Section("Comparison", note=f"skipped: {e}"))
    report = write_report(out / "report.html", "MoE Workbench demo",
                          f"{mm.spec}: {mm.model.config.model_type}, {mm.n_layers} layers, {mm.n_experts} experts, "
                          f"top-{mm.top_k}", sections)
    print(f"[demo] report: {report.resolve()}  ({time.time() - t0:.0f}s)")
    if serve:
        from .app import serve as serve_app

        print(f"[demo] serving the dashboard on http://127.0.0.1:{port} (Ctrl-C to stop)")
        serve_app([str(r.path) for r in runs.values()], model=mm.spec if mm.spec == "demo" else mm.path, port=port)
    return report


def _overview(mm, runs) -> str:
    lines = [f"model {mm.spec}  family {mm.family.model_type}  rule {mm.family.rule}  "
             f"MoE layers {mm.moe_layers}  experts {mm.n_experts}  top-{mm.top_k}"]
    for name, run in runs.items():
        n = sum(p["tokens"] for p in run.manifest["parts"])
        lines.append(f"run {name:14s} {n:8d} tokens  data {run.manifest['dataset']['name']}  "
                     f"probes {','.join(run.manifest['probes'])}")
    return "\n".join(lines)
