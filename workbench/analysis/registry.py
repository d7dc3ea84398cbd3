"""The one table of analyses: what each is, where it lives, what it needs, how it is run.

Read by the CLI (`workbench analyze NAME`: help, description, examples), the app (capture hints, the
tables and labels a page needs), `workbench export` and the demo (titles). Adding an analysis means a
module `workbench/analysis/<module>.py` with `analyze(run, **options)` (plus `figures`,
`add_arguments`, `options_from_args`, and optionally `after`) and one row here.

Imports nothing heavy (no numpy, polars or torch): `workbench --help` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnalysisSpec:
    name: str  # as typed on the command line and stored under RUN/analyses/<name>/
    module: str  # workbench.analysis.<module>
    summary: str  # one line: the CLI's help
    description: str  # a paragraph: `workbench analyze NAME --help`
    examples: tuple[str, ...] = ()  # command lines shown under `--help`
    requires_tables: tuple[str, ...] = ("routing",)  # run tables it reads
    requires_labels: tuple[str, ...] = ()  # label columns, any one of which it needs
    capture_hint: str = ""  # what to capture so it can run (shown by the app instead of an error)
    needs_model: bool = False  # runs the live model (closed loop) as well as reading the run
    runs: int = 1  # runs it compares (2: `workbench compare A B`)
    title: str = ""  # a heading for reports
    command: str = "analyze"  # the CLI command that runs it ("analyze" = `workbench analyze NAME`)

    @property
    def from_one_run(self) -> bool:
        """Computable from the run alone (the app's "compute now", `export --what analyses`)."""
        return self.runs == 1 and not self.needs_model

    def epilog(self) -> str:
        return "examples:\n" + "\n".join(f"  {e}" for e in self.examples) if self.examples else ""


ANALYSES: dict[str, AnalysisSpec] = {s.name: s for s in [
    AnalysisSpec(
        "stats", "stats", "expert usage: load, balance, co-activation, transitions, top tokens",
        "Routing statistics of a run: how often each expert is chosen per layer (all tokens and per "
        "value of each label column), load balance, dead and always-on experts, the tokens that "
        "choose each expert, co-activation within a layer and transitions between layers. "
        "Needs the routing probe.",
        examples=("workbench analyze stats runs/cal",
                  "workbench analyze stats runs/cal --labels domain --top-n 20 --out stats.parquet --figures figs/"),
        capture_hint="workbench capture MODEL --data DATA --out RUN  (the routing probe is on by default)",
        title="Routing statistics"),
    AnalysisSpec(
        "super-experts", "super_experts", "super experts: extreme down_proj outputs that make attention sinks",
        "Super experts (Su et al., ICLR 2026): experts in the first 75% of layers whose maximum "
        "|down_proj output| exceeds the 99.5th percentile and max/10; massive activations per "
        "layer; with --prune, perplexity and attention-sink decay with them zeroed against random "
        "experts. Needs the experts probe (hidden and attention for the full picture).",
        examples=("workbench analyze super-experts runs/cal",
                  "workbench analyze super-experts runs/cal --prune --prune-max-tokens 4096"),
        requires_tables=("expert_stats",),
        capture_hint="workbench capture MODEL --data calibration --out RUN --probes routing,experts,hidden,attention",
        title="Super experts"),
    AnalysisSpec(
        "lrc", "lrc", "local routing consistency: how well a model suits expert offloading and caching",
        "Local routing consistency (Liang et al., ICLR 2026): segment routing best performance SRP for "
        "windows of m tokens, per expert, per layer and for the model, and the hit rate of an expert cache "
        "of every size (SCH) next to LRU, LFU and Belady. Needs the routing probe.",
        examples=("workbench analyze lrc runs/cal", "workbench analyze lrc runs/cal --m 4,16 --seq-len 512 --n-boot 0"),
        capture_hint="workbench capture MODEL --data calibration --out RUN --seq-len 512  (long sequences)",
        title="Local routing consistency"),
    AnalysisSpec(
        "multilingual", "multilingual", "multilingual routing alignment: where languages share experts",
        "Multilingual routing alignment (Bandarkar et al., ICLR 2026): per layer, the divergence of "
        "each language's expert importance from the reference language on parallel text (a key "
        "label aligns translations, a lang label names the language), the middle layers where "
        "languages converge, language-specific experts, and with --steer the perplexity change "
        "when middle-layer task experts are promoted.",
        examples=("workbench analyze multilingual runs/ml",
                  "workbench analyze multilingual runs/ml --reference en --tau 0.3 --steer"),
        requires_labels=("lang",),
        capture_hint="workbench capture MODEL --data multilingual --out RUN  (records with `lang` and `key` labels)",
        title="Multilingual routing"),
    AnalysisSpec(
        "behavior", "behavior", "behaviour maps: experts that separate one class of prompts from the rest",
        "fTRI-style behaviour maps (Dahlke et al.): which experts light up on prompts of a target class "
        "against the others, a permutation test with FDR control and bootstrap stability, and with "
        "--intervene N the behaviour score on held-out prompts with the top N experts switched off "
        "or on, against random experts of the same layers.",
        examples=("workbench analyze behavior runs/beh --label class --target refusal",
                  "workbench analyze behavior runs/beh --intervene 10 --seeds 3"),
        capture_hint="workbench capture MODEL --data behavior --out RUN  (records with a `class` label, target vs control)",
        title="Behaviour map"),
    AnalysisSpec(
        "atlas", "atlas", "expert and token atlas: 2-D maps of experts and tokens by routing",
        "Expert atlas: seeded UMAP maps of experts by what selects them (label values, frequent tokens) "
        "and of tokens by their routing weights, with the labels the app colours by.",
        examples=("workbench analyze atlas runs/cal --labels domain", "workbench analyze atlas runs/cal --what experts"),
        capture_hint="workbench capture MODEL --data DATA --out RUN  (labels such as `lang` or `class` colour the map)",
        title="Expert atlas"),
    AnalysisSpec(
        "compare", "compare", "compare two runs: changed routing decisions, load, specialisation",
        "Compare run B with run A: per layer the share of tokens whose experts changed, top-k overlap, routing "
        "JSD, load shift per expert, specialisation shift per label, and each changed decision; runs of "
        "different data get load, balance and specialisation side by side. --match weights|routing first "
        "matches B's experts to A's (checkpoints).",
        examples=("workbench compare runs/base runs/banned --out cmp/", "workbench compare runs/ckpt1 runs/ckpt2 --match weights"),
        runs=2, title="Comparison", command="compare"),
    AnalysisSpec(
        "attribution", "attribution", "which experts cause the loss: first-order estimate, exact zeroing",
        "Attribute the mean token NLL of the run's text (or NLL(target) - NLL(control)) to every (layer, expert): "
        "the first-order effect of zeroing it from one backward pass, and exact zeroing of the largest.",
        examples=("workbench attribute demo --data calibration --where domain=code --max-tokens 512",
                  "workbench attribute demo --data calibration --control calibration --control-where domain=prose --exact 5"),
        requires_tables=("tokens",), needs_model=True, title="Causal attribution", command="attribute"),
    AnalysisSpec(
        "placement", "placement", "expert placement: GPU load balance for expert parallelism, EPLB suggestion",
        "Expert placement: per layer and window of tokens, the GPU load balance (mean/max load, the "
        "engines' balancedness) of an expert-parallel deployment, and a DeepSeek-EPLB-style placement "
        "with replicated hot experts, fitted on early windows and judged on later ones; --export-json "
        "writes it as SGLang's --init-expert-location file. Runs on captured and imported runs.",
        examples=("workbench analyze placement runs/cal --ep 8",
                  "workbench analyze placement runs/cal --ep 4 --redundant 4 --export-json placement.json"),
        title="Expert placement"),
]}


def spec(name: str) -> AnalysisSpec:
    """The row of `name`; a WorkbenchError naming the analyses otherwise."""
    if name not in ANALYSES:
        from ..errors import WorkbenchError

        raise WorkbenchError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    return ANALYSES[name]


def cli_analyses() -> dict[str, AnalysisSpec]:
    """The `workbench analyze NAME` subcommands, in table order."""
    return {n: s for n, s in ANALYSES.items() if s.command == "analyze"}
