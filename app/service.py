"""The live model behind the Steering lab: one model, one lock, jobs run off the request threads.

Why not Dash's DiskcacheManager: it runs each background callback in a fresh process, which would
either reload the model per job or fork a process holding a torch model (its thread pools do not
survive fork reliably), and a lock could not serialise processes that each own a copy. Instead one
worker thread owns the model; callbacks submit a job and return at once, and a dcc.Interval polls
for the result. The request threads (Flask serves each request on its own thread) stay free, so a
long generation never freezes other pages or other sessions.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import Future

from ..errors import WorkbenchError
from .state import Worker

log = logging.getLogger("workbench.app")

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 64
MODES = ("ban", "force", "boost", "zero")


def spec_of(items) -> str:
    return ",".join(f"L{int(layer)}:E{int(expert)}" for layer, expert in items)


def interventions_from_state(items: list) -> dict:
    """Steering state rows [layer, expert, mode, value] -> the interventions dict `compare` takes."""
    out: dict = {}
    for row in items or []:
        layer, expert, mode = int(row[0]), int(row[1]), str(row[2])
        if mode not in MODES:
            raise WorkbenchError(f"unknown intervention {mode!r}; choose from {', '.join(MODES)}")
        if mode == "boost":
            value = float(row[3]) if len(row) > 3 and row[3] is not None else 0.5
            out.setdefault("boost", {})[f"L{layer}:E{expert}"] = value
        else:
            out.setdefault(mode, []).append((layer, expert))
    return out


class ModelService:
    """Runs steering comparisons on the shared model, one at a time, under a lock."""

    def __init__(self, mm, max_jobs: int = 256):
        self.mm = mm
        self.lock = threading.Lock()
        self._pool = Worker("workbench-model")
        self._jobs: OrderedDict[str, tuple[Future, float]] = OrderedDict()
        self._latest: dict[str, str] = {}
        self._guard = threading.Lock()
        self.max_jobs = max_jobs

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
        """Queue a comparison; a session's still-queued older job is dropped (only the newest matters)."""
        prompt = self.check_prompt(prompt)
        inter = interventions_from_state(items)
        n_new = max(1, min(int(max_new_tokens or 1), MAX_NEW_TOKENS))
        job_id = uuid.uuid4().hex
        fut = self._pool.submit(self._run, prompt, inter, n_new, bool(sample), int(seed or 0))
        with self._guard:
            old = self._latest.get(session)
            if old and old in self._jobs:
                self._jobs[old][0].cancel()
            self._latest[session] = job_id
            self._jobs[job_id] = (fut, time.time())
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        return job_id

    def _run(self, prompt, inter, max_new_tokens, sample, seed) -> dict:
        from ..steering import compare

        with self.lock:
            t0 = time.perf_counter()
            res = compare(self.mm, prompt, inter, max_new_tokens=max_new_tokens, sample=sample, seed=seed)
            return {"result": res, "seconds": time.perf_counter() - t0, "interventions": inter}

    def poll(self, job_id: str) -> tuple[str, object]:
        """(state, payload): queued/running/done/error/unknown; payload is the result dict or a message."""
        with self._guard:
            entry = self._jobs.get(job_id)
        if entry is None:
            return "unknown", "this result has expired; change anything to run again"
        fut, started = entry
        if fut.cancelled():
            return "unknown", "superseded by a newer request"
        if not fut.done():
            return ("running" if fut.running() else "queued"), time.time() - started
        err = fut.exception()
        if err is None:
            return "done", fut.result()
        if isinstance(err, WorkbenchError):
            return "error", str(err)
        log.error("steering job failed:\n%s", "".join(traceback.format_exception(err)))
        return "error", f"generation failed: {type(err).__name__}: {err}"

    def close(self) -> None:
        self._pool.shutdown()
