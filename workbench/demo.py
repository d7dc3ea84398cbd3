"""`workbench demo`: the main job, offline. Bundled model + datasets -> runs -> every analysis -> report -> app.

Completed captures are reused (a run folder whose manifest says complete for the same model, data
and settings is not redone), so a second `workbench demo` goes straight to the analyses.
"""

from __future__ import annotations

import time
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


def say(msg: str) -> None:
    """One line of the demo's progress, shown at once (stdout may be a pipe, which buffers)."""
    print(f"[demo] {msg}", flush=True)


def run_demo(out: str | Path = "demo_out", serve: bool = True, port: int = 8050, quick: bool = False,
             host: str = "127.0.0.1") -> Path:
    """Capture, analyse, report; with `serve`, the dashboard is up as soon as the first run is captured.

    Serving early: the other captures follow on this thread (they hold the model's lock, so the
    Steering lab waits for them rather than running the model at the same time), and each analysis
    runs on its run's dashboard worker (closed-loop ones on the model worker), so every page shows
    its own progress and fills in when its result lands. The report is written when all are done.
    """
    import threading

    from . import analysis as an
    from .app.state import Unavailable
    from .capture import capture
    from .data import load_dataset, subset
    from .report import Section, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    say("loading the demo model ...")
    mm, note = _model(out)
    say(f"model: {mm.spec} ({mm.model.config.model_type}, {mm.n_layers} layers, {mm.n_experts} experts, "
        f"top-{mm.top_k}) loaded in {time.time() - t0:.0f}s")
    run_plans, analysis_plans = plans(quick)
    suffix = "-quick" if quick else ""
    names = [rp.name + suffix for rp in run_plans] + (["code-banned" + suffix] if any(rp.name == "code" for rp in run_plans)
                                                        else [])
    live = None
    service = _service(mm, host) if serve else None
    # one lock for the model: captures here and closed-loop jobs on the run workers take turns
    lock = service.lock if service is not None else threading.Lock()
    runs, data, datas = {}, {}, {}
    for rp in run_plans:
        ds = data[rp.name] = load_dataset(rp.dataset)
        if rp.where or rp.first_keys or rp.limit or rp.interleave:
            ds = data[rp.name] = subset(ds, where=rp.where, first_keys=rp.first_keys, limit=rp.limit,
                                        interleave=rp.interleave)
        say(f"capture {rp.name}: {ds.name}, {len(ds.records)} records, probes {','.join(rp.probes)}")
        path = out / "runs" / (rp.name + suffix)
        kw = dict(probes=rp.probes, logits=rp.logits, seq_len=rp.seq_len, max_tokens=rp.max_tokens, batch_size=8)
        if live is not None:
            live.set_state(rp.name + suffix, f"capturing {len(ds.records)} records of {ds.name}")
        with lock:
            try:
                runs[rp.name] = capture(mm, ds, path, resume=True, **kw)
            except RunMismatch:  # the demo's plan changed (a newer workbench): the demo folder is ours to redo
                say(f"  {path} holds an older demo capture; capturing again")
                runs[rp.name] = capture(mm, ds, path, overwrite=True, **kw)
        if serve and live is None:
            live, url = _serve(names, service, host, port)
            for n in names[1:]:
                live.set_state(n, "queued: captured after " + names[0])
        if not datas:
            _share_cores()
        datas[rp.name] = _run_data(live, rp.name + suffix, runs[rp.name])
        _queue(datas[rp.name], rp.name, analysis_plans, mm, lock, model=False)  # they start during the next capture
        if live is not None and len(live.apps) == 1:
            say(f"dashboard: {url}  (up {time.time() - t0:.0f}s after the start; the other runs and analyses "
                "are computed in the background, each page shows its progress and fills in when ready)")
    compared, tables_dir = None, out / "tables"
    if "code" in runs:  # compare: the same code/prose prompts with the top-8 code experts banned
        say("compare code prompts: as is vs top-8 code experts banned (captures them again with the experts banned)")
        name = "code-banned" + suffix
        if live is not None:
            live.set_state(name, "capturing the code prompts with the top-8 code experts banned")
        try:
            from .analysis import compare as cmp
            from .plots import polish_all

            runs["code-banned"] = _capture_banned(mm, runs["code"], data["code"], out / "runs" / name, lock)
            if live is not None:
                live.add(name, runs["code-banned"].path, warm=())
            for run_name in datas:  # the model is free for the closed loops while the comparison is computed
                _queue(datas[run_name], run_name, analysis_plans, mm, lock, model=True)
            result = cmp.analyze(runs["code"], other=runs["code-banned"], labels=["class"])
            figs = polish_all("compare", cmp.figures(result))
            an.write_table(result.table, tables_dir / "compare-code-banned.parquet")
            compared = Section("Comparison: code prompts with the top-8 code experts banned", summary=result.summary,
                               figures=figs, tables=dict(list(result.tables.items())[:4]))
            if live is not None:
                from .app.compare import remember

                remember(runs["code"], runs["code-banned"], "none", result, figs)
        except WorkbenchError as e:
            compared = Section("Comparison", note=f"skipped: {e}")
            say(f"  skipped: {e}")
    # the closed loops run the model: after the captures, so every run is on the dashboard first
    for name in datas:
        _queue(datas[name], name, analysis_plans, mm, lock, model=True)
    sections = [Section("Model and runs", summary=_overview(mm, runs), note=note or "")]
    for ap in analysis_plans:
        t = time.time()
        say(f"analyze {ap.analysis} on {ap.run}" + (" (waiting for the background worker)" if live else ""))
        res, figs = _result(datas, ap, mm, lock)
        if isinstance(res, Unavailable):
            word = "failed" if res.kind == "failed" else "skipped"
            sections.append(Section(ap.heading, note=f"{word}: {res.message}"))
            say(f"  {word}: {res.message}")
            continue
        an.write_table(res.table, tables_dir / f"{ap.analysis}-{ap.run}.parquet")
        sections.append(Section(ap.heading, summary=res.summary, figures=figs,
                                tables=dict(list(res.tables.items())[:4])))
        say(f"  ready ({time.time() - t:.1f}s waited here)" if live else f"  done in {time.time() - t:.1f}s")
    if compared is not None:
        sections.append(compared)
    say("writing the report ...")
    report = write_report(out / "report.html", "MoE Workbench demo",
                          f"{mm.spec}: {mm.model.config.model_type}, {mm.n_layers} layers, {mm.n_experts} experts, "
                          f"top-{mm.top_k}", sections)
    say(f"report: {report.resolve()}  (everything done {time.time() - t0:.0f}s after the start)")
    if live is not None:
        say(f"still serving the dashboard on {url} (Ctrl-C to stop)")
        _serve_forever(live)
    return report


def _capture_banned(mm, run, data, out: Path, lock, n: int = 8):
    """The code prompts captured again with the top-`n` experts of the code run's behaviour map (target vs
    the rest) banned: `analysis.compare.demo_comparison`'s capture, holding the model's lock for the capture
    only (the comparison itself then runs beside the closed loops)."""
    from .analysis import behavior
    from .capture import capture
    from .probes.interventions import format_spec

    maps = behavior.activation_maps(run, "class")
    if "target" not in maps.classes:
        raise WorkbenchError(f"run {run.path} has no class=target prompts to find the experts to ban")
    experts = behavior.top_experts(behavior.contrast(maps, "target", permutations=0, bootstrap=0, top_n=n), n)
    settings = run.manifest.get("settings", {})
    with lock:
        return capture(mm, data, out, resume=True, interventions={"ban": format_spec(experts)}, progress=False,
                       batch_size=settings.get("batch_size", 8), seq_len=settings.get("seq_len"),
                       max_tokens=settings.get("max_tokens"))


def _share_cores() -> None:
    """From here on the model's work (captures, closed loops) and the background analyses run side by
    side: each gets half the cores, unless the user chose a count (--threads, WORKBENCH_THREADS,
    OMP/MKL_NUM_THREADS). Measured on 2 quiet cores: torch on 2 threads beside the analyses' numba and
    polars work took 238 s for the whole demo, on 1 thread 184 s (benchmarks/results/first_hour_cpu.json)."""
    from . import threads

    if threads.automatic():
        threads.configure(max(1, threads.available_cpus() // 2))


def _service(mm, host):
    """The Steering lab's model service; its lock is the model's lock for the whole demo."""
    from .app.main import check_serve_options
    from .app.service import ModelService

    check_serve_options(host)  # before any work: a refused --host costs nothing
    return ModelService(mm)


def _serve(names, service, host, port):
    """Start serving (no run yet: the caller adds them); returns (LiveDashboard, url)."""
    from .app import live as lv

    dash = lv.LiveDashboard(names, service=service)
    _srv, url = lv.start(dash, host=host, port=port)
    return dash, url


def _serve_forever(live) -> None:
    """Until Ctrl-C (the server runs on a daemon thread)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        live.http.close()
        say("stopped")


# Background jobs report to the pages (common.report_progress), not to the console, where their bars
# would interleave with the demo's own lines; `progress` is not part of a stored result's key.
QUIET = {name: {"progress": False} for name in ("stats", "super-experts", "lrc", "multilingual", "behavior", "atlas")}


def _run_data(live, name, run):
    """The run's analysis state: its dashboard's (so pages see the demo's jobs) or a standalone one."""
    if live is not None:
        return live.add(name, run.path, warm=(), analysis_options=QUIET).workbench.data
    from .app.state import RunData

    return RunData(run, QUIET)


def _job(ap: AnalysisPlan, mm):
    """(cache slot, options, uses the model) of a planned analysis: a model-backed one is the page's
    closed-loop variant ('<name>:loop'), as the dashboard's button would start it."""
    if ap.model:
        return f"{ap.analysis}:loop", {**ap.options, "model": mm}, True
    return ap.analysis, dict(ap.options), False


def _queue(data, run_name, analysis_plans, mm, lock, model: bool) -> None:
    """Start the planned analyses of `run_name` on its run's workers: the CPU ones (in plan order, on one
    worker; for a closed loop its plain part, profile or maps, which the page shows above it), or the
    closed loops (`model`: on the model worker, which takes `lock` around each)."""
    for ap in analysis_plans:
        if ap.run != run_name:
            continue
        key, opts, uses_model = _job(ap, mm)
        if not model:
            data.analysis(ap.analysis, options={} if uses_model else opts)
        elif uses_model:
            data.analysis(ap.analysis, variant=key, options=opts, lock=lock)


def _result(datas, ap: AnalysisPlan, mm, lock):
    """Wait for a planned analysis: (AnalysisResult or Unavailable, figures)."""
    from .app.state import Unavailable

    data = datas.get(ap.run)
    if data is None:
        return Unavailable(f"the {ap.run} run was not captured"), {}
    key, opts, model = _job(ap, mm)
    res = None
    while res is None:
        res = data.analysis(ap.analysis, variant=key if model else None, options=opts, wait=5.0,
                            lock=lock if model else None)
    return res, data.figures(key)


def _overview(mm, runs) -> str:
    lines = [f"model {mm.spec}  family {mm.family.model_type}  rule {mm.family.rule}  "
             f"MoE layers {mm.moe_layers}  experts {mm.n_experts}  top-{mm.top_k}"]
    for name, run in runs.items():
        n = run.n_tokens
        lines.append(f"run {name:14s} {n:8d} tokens  data {run.manifest['dataset']['name']}  "
                     f"probes {','.join(run.manifest['probes'])}")
    return "\n".join(lines)
