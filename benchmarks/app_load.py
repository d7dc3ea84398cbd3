"""Dashboard load test: N concurrent sessions on loopback browsing pages and steering a tiny model.

    .venv/bin/python benchmarks/app_load.py                              # 20 sessions, 180 s
    .venv/bin/python benchmarks/app_load.py --sessions 8 --seconds 30 --out /tmp/load.json

The dashboard runs as it is deployed: `workbench app RUN --model TINY` in its own process (waitress),
and each session is a thread speaking Dash's HTTP API as a browser tab does (page load, the router
callback per page, the Tokens page's callbacks, and the Steering lab: submit, then poll every 0.4 s
until done). Each session steers its own prompt with its own banned expert; its result must be its own
(the prompt it sent, the intervention it chose, and the steered text `workbench.steering.compare`
gives for exactly that, computed here independently). Checked: no HTTP error, no error in any
callback, no result of another session; the server's RSS sampled every second (stable = the last
third within a few percent of the middle third). Latency percentiles per kind of request go to JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["/", "/tokens", "/experts", "/super-experts", "/locality", "/multilingual", "/behavior", "/atlas",
         "/steering", "/export"]
POLL_S = 0.4  # what the Steering lab's dcc.Interval uses


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def prepare(workdir: Path, n_layers: int = 2, n_experts: int = 8):
    """A tiny random qwen3_moe (experts scaled up so banning one changes the text) and a run to browse."""
    import torch
    from safetensors.torch import load_file, save_file

    from workbench.app.synthetic import write_synthetic_run
    from workbench.models.tiny import make_tiny

    model_dir = Path(make_tiny("qwen3_moe", workdir / "model", layers=n_layers, experts=n_experts, top_k=2,
                               hidden=64))
    for f in model_dir.glob("*.safetensors"):
        w = load_file(f)
        w = {k: (v * 40 if "down_proj" in k else v).contiguous() for k, v in w.items()}
        save_file(w, f, metadata={"format": "pt"})
    run = write_synthetic_run(workdir / "run", n_tokens=4000, n_layers=n_layers, n_experts=n_experts, top_k=2,
                              seq_len=200)
    del torch
    return model_dir, run.path


class Server:
    """`workbench app RUN --model MODEL` in a child process on a free loopback port."""

    def __init__(self, run: Path, model: Path, threads_env: str = "1"):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": threads_env, "MKL_NUM_THREADS": threads_env, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "app", str(run), "--model", str(model),
                                      "--port", str(self.port)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        end = time.time() + 180
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("the dashboard exited:\n" + "".join(self.log))
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/_dash-layout")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("the dashboard did not start in 180 s:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """One browser tab: a keep-alive connection speaking Dash's callback API."""

    def __init__(self, port: int, deps: list[dict], record):
        self.port, self.record = port, record
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.by_input = {}
        for d in deps:
            for i in d["inputs"]:
                self.by_input.setdefault(f"{i['id']}.{i['property']}", d)

    def request(self, kind: str, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        t0 = time.perf_counter()
        for attempt in (0, 1):  # a keep-alive connection the server closed (idle timeout): reconnect once
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                payload = r.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        self.record(kind, time.perf_counter() - t0, r.status)
        if r.status not in (200, 204):
            raise AssertionError(f"{kind}: HTTP {r.status} {payload[:200]!r}")
        if payload and r.status == 200 and r.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return None

    def callback(self, kind: str, trigger: str, values: dict):
        """Fire the callback that `trigger` (id.prop) feeds, with `values` for its inputs and state."""
        d = self.by_input[trigger]
        outs = [o for o in d["output"].strip(".").split("...")]
        outputs = []
        for o in outs:
            oid, prop = o.split(".", 1)
            outputs.append({"id": oid, "property": prop.split("@")[0]})

        def fill(deps):
            return [{"id": i["id"], "property": i["property"], "value": values.get(f"{i['id']}.{i['property']}")}
                    for i in deps]

        body = {"output": d["output"], "outputs": outputs if len(outputs) > 1 else outputs[0],
                "inputs": fill(d["inputs"]), "state": fill(d["state"]), "changedPropIds": [trigger]}
        out = self.request(kind, "POST", "/_dash-update-component", body)
        side = (out or {}).get("sideUpdate", {}).get("wb-error", {})
        if side.get("children"):
            raise AssertionError(f"{kind}: the page reported an error: {side['children']}")
        return (out or {}).get("response", {})


def _texts(node) -> list[str]:
    """Every string in a Dash component tree, in order."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [t for n in node for t in _texts(n)]
    if isinstance(node, dict):
        if "props" in node:
            return _texts(node["props"].get("children"))
        return []
    return []


def _find(node, cid):
    if isinstance(node, list):
        for n in node:
            if (hit := _find(n, cid)) is not None:
                return hit
    elif isinstance(node, dict) and "props" in node:
        if node["props"].get("id") == cid:
            return node
        return _find(node["props"].get("children"), cid)
    return None


def session(i: int, port: int, deps, stop_at: float, record, expected: dict, results: dict, errors: list,
            n_experts: int, seed: int, pages: list[str]):
    rnd = random.Random(seed * 1000 + i)
    sid = f"session-{i:03d}-{rnd.getrandbits(48):012x}"
    prompt, ban = expected["prompt"], expected["ban"]
    try:
        c = Client(port, deps, record)
        c.request("page load", "GET", "/")
        c.request("page load", "GET", "/_dash-layout")
        steers = 0
        while time.time() < stop_at:
            r = rnd.random()
            if r < 0.45:
                page = rnd.choice(pages)
                out = c.callback("page", "url.pathname", {"url.pathname": page})
                if "wb-page" not in out:
                    raise AssertionError(f"page {page}: no content")
            elif r < 0.7:
                doc = rnd.randrange(0, 20)
                c.callback("tokens: document", "tok-doc.value", {"tok-doc.value": doc})
                c.callback("tokens: colour", "tok-layer.value",
                           {"tok-doc.value": doc, "tok-layer.value": rnd.randrange(0, 2), "tok-offset.value": 0})
            else:
                items = [[ban[0], ban[1], "ban", None]]
                t0 = time.perf_counter()
                out = c.callback("steer: submit", "steer-run.n_clicks", {
                    "steer-state.data": {"items": items}, "steer-run.n_clicks": steers + 1, "steer-n.value": 8,
                    "steer-sample.value": [], "steer-seed.value": 0, "steer-prompt.value": prompt,
                    "session-id.data": sid})
                job = out["steer-job"]["data"]
                if not job:
                    raise AssertionError(f"steer refused: {out['steer-status']['children']}")
                while True:
                    time.sleep(POLL_S)
                    out = c.callback("steer: poll", "steer-poll.n_intervals",
                                     {"steer-poll.n_intervals": 1, "steer-job.data": job})
                    if "steer-out" in out:
                        break
                    status = out.get("steer-status", {}).get("children")
                    if isinstance(status, dict):  # an error span
                        raise AssertionError(f"steer failed: {_texts(status)}")
                record("steer: result", time.perf_counter() - t0, 200)
                tree = out["steer-out"]["children"]
                steered = _find(tree, "steer-steered")
                got = {"prompt": _texts(steered)[0], "steered": "".join(_texts(steered)[1:]),
                       "status": out["steer-status"]["children"]}
                if m := re.match(r"done in ([0-9.]+) s", got["status"]):
                    record("steer: model time", float(m.group(1)), 200)
                results.setdefault(i, []).append(got)
                steers += 1
    except Exception as e:  # recorded, the run goes on: the report counts them
        errors.append(f"session {i}: {type(e).__name__}: {e}")


def expected_results(model_dir: Path, n: int, n_experts: int, n_layers: int) -> dict:
    """Per session: its prompt, its banned expert, and the steered text computed here, independently."""
    from workbench.models.loading import load_model
    from workbench.steering import compare

    mm = load_model(str(model_dir))
    words = ["river", "engine", "garden", "signal", "market", "winter", "orbit", "ladder", "copper", "violet"]
    out = {}
    cache = {}
    for i in range(n):
        prompt = f"Session {i}: the {words[i % len(words)]} and the {words[(i * 3 + 1) % len(words)]}"
        ban = (i % n_layers, i % n_experts)
        key = (prompt, ban)
        if key not in cache:
            res = compare(mm, prompt, {"ban": [ban]}, max_new_tokens=8)
            cache[key] = "".join(res.steered_tokens)
        out[i] = {"prompt": prompt, "ban": ban, "steered": cache[key]}
    return out


def run_load(n_sessions: int = 20, seconds: float = 180.0, workdir: Path | None = None, seed: int = 0,
             warmup_frac: float = 0.25, pages=PAGES) -> dict:
    """Serve, browse and steer for `seconds`; the report (see the module docstring). RSS stability is
    judged after the first `warmup_frac` of the time (first visits compute and cache the analyses)."""
    import tempfile

    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    workdir = Path(workdir or tmp.name)
    n_layers, n_experts = 2, 8
    model_dir, run = prepare(workdir, n_layers, n_experts)
    expected = expected_results(model_dir, n_sessions, n_experts, n_layers)
    server = Server(run, model_dir)
    lat: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def record(kind, s, status):
        with lock:
            lat.setdefault(kind, []).append(s)
            statuses[status] = statuses.get(status, 0) + 1

    try:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        c.request("GET", "/_dash-dependencies")
        deps = json.loads(c.getresponse().read())
        rss: list[tuple[float, int]] = []
        results: dict = {}
        errors: list[str] = []
        t0 = time.time()
        stop_at = t0 + seconds
        threads = [threading.Thread(target=session, args=(i, server.port, deps, stop_at, record, expected[i],
                                                          results, errors, n_experts, seed, list(pages)),
                                daemon=True)
                   for i in range(n_sessions)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.time() - t0, server.rss()))
            time.sleep(1.0)
        rss.append((time.time() - t0, server.rss()))
    finally:
        server.close()
        if tmp is not None:
            tmp.cleanup()

    # each session's results are its own: its prompt, its ban, the steered text compare() gives for them
    mixed = []
    for i, got in results.items():
        exp = expected[i]
        for g in got:
            if (g["prompt"] != exp["prompt"] or f"ban L{exp['ban'][0]}:E{exp['ban'][1]}" not in g["status"]
                    or g["steered"] != exp["steered"]):
                mixed.append({"session": i, "got": g, "expected": exp})
    vals = [v for t, v in rss if t >= seconds * warmup_frac] or [v for _, v in rss]
    third = max(1, len(vals) // 3)
    mid, last = statistics.median(vals[third:2 * third] or vals), statistics.median(vals[-third:])
    return {
        "sessions": n_sessions, "seconds": seconds, "pages": list(pages), "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors, "foreign_results": mixed,
        "steering_results": sum(len(v) for v in results.values()),
        "sessions_with_results": len(results),
        "latency_s": {k: _pct(v) for k, v in sorted(lat.items())},
        "rss_mb": {"start": round(rss[0][1] / 2**20, 1), "after_warmup_middle_third": round(mid / 2**20, 1),
                   "last_third": round(last / 2**20, 1), "max": round(max(v for _, v in rss) / 2**20, 1),
                   "growth_last_vs_middle": round(last / mid - 1, 4)},
        "rss_samples_mb": [[round(t, 1), round(v / 2**20, 1)] for t, v in rss],
    }


def _pct(xs: list[float]) -> dict:
    xs = sorted(xs)

    def q(p):
        return round(xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))], 4)

    return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(xs[-1], 4)}


def machine() -> dict:
    import dash
    import torch
    import transformers
    import waitress

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "transformers": transformers.__version__, "dash": dash.__version__,
            "waitress": waitress.__version__ if hasattr(waitress, "__version__") else _dist_version("waitress")}


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/app_load_cpu.json"))
    args = ap.parse_args()
    info = machine()
    res = run_load(args.sessions, args.seconds, seed=args.seed)
    res["machine"] = info
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    summary = {k: res[k] for k in ("sessions", "seconds", "requests", "statuses", "steering_results")}
    print(json.dumps(summary), "\nerrors:", len(res["errors"]), "foreign results:", len(res["foreign_results"]))
    for k, v in res["latency_s"].items():
        print(f"  {k:20s} n={v['n']:6d} p50={v['p50']:.3f}s p90={v['p90']:.3f}s p99={v['p99']:.3f}s max={v['max']:.3f}s")
    print("  rss MB:", res["rss_mb"])
    return 0 if not res["errors"] and not res["foreign_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
