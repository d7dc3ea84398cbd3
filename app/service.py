"""The live model behind the Steering lab: one model, one lock, a bounded fair queue off the request threads.

Why not Dash's DiskcacheManager: it runs each background callback in a fresh process, which would
either reload the model per job or fork a process holding a torch model (its thread pools do not
survive fork reliably), and a lock could not serialise processes that each own a copy. Instead one
worker thread owns the model; callbacks submit a job and return at once, and a dcc.Interval polls
for the result. The request threads (waitress serves requests on a pool of threads) stay free, so a
long generation never freezes other pages or other sessions.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import WorkbenchError

log = logging.getLogger("workbench.app")

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 64
MODES = ("ban", "force", "boost", "zero")
MAX_ITEMS = 4096  # steering rows accepted without a model to size them by (with one: its layers x experts)


def spec_of(items) -> str:
    return ",".join(f"L{int(layer)}:E{int(expert)}" for layer, expert in items)


def clean_items(items, mm=None) -> list[list]:
    """Steering state rows [layer, expert, mode, value] as a browser sent them, checked before any work: a
    list of at most one row per (layer, expert) cell of the model (a later row replaces an earlier one), so a
    request cannot make the map, the chips or the queue do more than the model's size of work. Malformed or
    out-of-range rows are refused in one sentence."""
    import math

    if items is None:
        return []
    if not isinstance(items, list):
        raise WorkbenchError("the steering selection is malformed (not a list of [layer, expert, mode] rows)")
    layers = list(getattr(mm, "moe_layers", []) or []) if mm is not None else None
    n_exp = int(getattr(mm, "n_experts", 0) or 0) if mm is not None else None
    cap = len(layers) * (n_exp + 1) if layers else MAX_ITEMS
    if len(items) > cap:
        raise WorkbenchError(f"the steering selection has {len(items)} rows; at most {cap} fit this model "
                             "(one per layer and expert)")
    out: dict = {}
    for row in items:
        if not isinstance(row, (list, tuple)) or not 3 <= len(row) <= 4:
            raise WorkbenchError("the steering selection is malformed (each row is [layer, expert, mode, value])")
        layer, expert, mode = row[0], row[1], row[2]
        value = row[3] if len(row) > 3 else None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, expert)):
            raise WorkbenchError("the steering selection is malformed (layer and expert must be whole numbers)")
        if mode not in MODES:
            raise WorkbenchError(f"unknown intervention {str(mode)[:20]!r}; choose from {', '.join(MODES)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise WorkbenchError("the steering selection is malformed (a boost value must be a finite number)")
        if layers is not None and (layer not in layers or not -1 <= expert < n_exp):
            raise WorkbenchError(f"L{layer}:E{expert} is not an expert of this model's MoE layers")
        out[(layer, expert)] = [layer, expert, mode, value]
    return [out[k] for k in sorted(out)]


def interventions_from_state(items: list, mm=None) -> dict:
    """Steering state rows [layer, expert, mode, value] -> the interventions dict `compare` takes."""
    out: dict = {}
    for row in clean_items(items, mm):
        layer, expert, mode = int(row[0]), int(row[1]), str(row[2])
        if mode not in MODES:
            raise WorkbenchError(f"unknown intervention {mode!r}; choose from {', '.join(MODES)}")
        if mode == "boost":
            value = float(row[3]) if len(row) > 3 and row[3] is not None else 0.5
            out.setdefault("boost", {})[f"L{layer}:E{expert}"] = value
        else:
            out.setdefault(mode, []).append((layer, expert))
    return out


class _Cancelled(Exception):
    """Raised inside a running generation when its session has asked for something newer."""


@dataclass(eq=False)
class _Job:
    id: str
    session: str
    args: tuple
    submitted: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.time)  # last submit or poll: a job nobody polls is abandoned
    started: float | None = None
    state: str = "queued"  # queued | running | done | error | cancelled
    payload: object = None
    cancel: threading.Event = field(default_factory=threading.Event)


class ModelService:
    """Runs steering comparisons on the shared model, one at a time, fairly between sessions.

    The queue is bounded: a session (browser tab) has at most one job queued and one running; a newer
    request from it cancels both (the running one stops at its next forward pass). Overall at most
    `max_queued` jobs wait; beyond that a request is refused in one sentence. Jobs run in arrival order,
    so a request waits behind at most one job per other session. A queued job nobody has polled for
    `abandon_after` seconds (tab closed, client gone) is dropped unrun.
    """

    def __init__(self, mm, max_queued: int = 32, max_results: int = 256, abandon_after: float = 30.0):
        self.mm = mm
        self.lock = threading.Lock()  # held while the model runs; closed-loop analyses take it too
        self.max_queued = max_queued
        self.max_results = max_results
        self.abandon_after = abandon_after
        self._cv = threading.Condition()
        self._queue: OrderedDict[str, _Job] = OrderedDict()  # session -> its one queued job, arrival order
        self._running: _Job | None = None
        self._jobs: OrderedDict[str, _Job] = OrderedDict()  # id -> job, for polling (bounded)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="workbench-model", daemon=True)
        self._thread.start()

    def check_prompt(self, prompt: str) -> str:
        prompt = (prompt or "")[:MAX_PROMPT_CHARS]
        if not prompt.strip():
            raise WorkbenchError("type a prompt to steer")
        n = len(self.mm.tokenize(prompt))
        if n > MAX_PROMPT_TOKENS:
            raise WorkbenchError(f"the prompt is {n} tokens; the lab takes at most {MAX_PROMPT_TOKENS}")
        return prompt

    def parse(self, spec: str) -> list[tuple[int, int]]:
        """A SPEC typed in the browser, validated against the model (one-sentence errors)."""
        from ..probes.interventions import parse_spec

        return [(int(a), int(b)) for a, b in parse_spec(spec, self.mm)]

    def submit(self, session: str, prompt: str, items: list, max_new_tokens: int = 24, sample: bool = False,
               seed: int = 0) -> str:
        """Queue a comparison for `session`, superseding (cancelling) whatever that session still has queued
        or running; refused in one sentence when `max_queued` jobs of other sessions already wait."""
        prompt = self.check_prompt(prompt)
        inter = interventions_from_state(items, self.mm)
        n_new = max(1, min(int(max_new_tokens or 1), MAX_NEW_TOKENS))
        session = str(session or "anon")[:64]
        job = _Job(uuid.uuid4().hex, session, (prompt, inter, n_new, bool(sample), int(seed or 0)))
        with self._cv:
            others = sum(1 for s in self._queue if s != session)
            if others >= self.max_queued:
                raise WorkbenchError(f"the model is busy with {others} queued requests; try again in a moment")
            old = self._queue.pop(session, None)
            if old is not None:
                self._finish(old, "cancelled", "superseded by a newer request")
            if self._running is not None and self._running.session == session:
                self._running.cancel.set()
            self._queue[session] = job
            self._jobs[job.id] = job
            self._trim()
            self._cv.notify_all()
        return job.id

    def poll(self, job_id: str) -> tuple[str, object]:
        """(state, payload). queued: {"ahead": jobs before it, "seconds": waited}; running: seconds so far;
        done: the result dict; error/cancelled/unknown: a message."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                return "unknown", "this result has expired; change anything to run again"
            job.touched = time.time()
            if job.state == "queued":
                # a running job already superseded stops at its next step: it does not count as ahead
                busy = self._running is not None and not self._running.cancel.is_set()
                ahead = list(self._queue.values()).index(job) + busy
                return "queued", {"ahead": ahead, "seconds": time.time() - job.submitted}
            if job.state == "running":
                return "running", time.time() - (job.started or job.submitted)
            return job.state, job.payload

    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue)

    # -- the worker -------------------------------------------------------------------------------------
    def _finish(self, job: _Job, state: str, payload) -> None:
        job.state, job.payload = state, payload

    def _trim(self) -> None:
        while len(self._jobs) > self.max_results:
            old = next((k for k, j in self._jobs.items() if j.state not in ("queued", "running")), None)
            if old is None:
                break
            del self._jobs[old]

    def _next(self) -> _Job | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                while self._queue:
                    _, job = self._queue.popitem(last=False)
                    if time.time() - job.touched > self.abandon_after:
                        self._finish(job, "cancelled", "dropped: nobody asked for this result any more")
                        continue
                    job.state, job.started = "running", time.time()
                    self._running = job
                    return job
                self._cv.wait()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                state, payload = "done", self._run(job)
            except _Cancelled:
                state, payload = "cancelled", "superseded by a newer request"
            except WorkbenchError as e:
                state, payload = "error", str(e)
            except Exception as e:  # a bug must not stop the worker; the user sees one sentence
                log.error("steering job failed:\n%s", "".join(traceback.format_exception(e)))
                state, payload = "error", f"generation failed: {type(e).__name__}: {e}"
            with self._cv:
                self._finish(job, state, payload)
                self._running = None
                self._trim()

    def _run(self, job: _Job) -> dict:
        from ..steering import compare

        prompt, inter, max_new_tokens, sample, seed = job.args

        def stop_if_superseded(_module, _args):
            if job.cancel.is_set():
                raise _Cancelled

        with self.lock:
            if job.cancel.is_set():
                raise _Cancelled
            # Checked before every forward pass (each generated token): a superseded job stops within one step.
            handle = self.mm.model.register_forward_pre_hook(stop_if_superseded)
            try:
                t0 = time.perf_counter()
                res = compare(self.mm, prompt, inter, max_new_tokens=max_new_tokens, sample=sample, seed=seed)
            finally:
                handle.remove()
            return {"result": res, "seconds": time.perf_counter() - t0, "interventions": inter}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._queue.values():
                self._finish(job, "cancelled", "the dashboard is shutting down")
            self._queue.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._cv.notify_all()
