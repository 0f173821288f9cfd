"""Scale-out: jobs per minute with 1 and 2 workers, and the latency of one job with `workers: 2`
against `workers: 1`, side by side, in one run.

Two `entropy-probe serve` run side by side, ENTROPY_PROBE_DEVICES=cpu and cpu,cpu, one torch
thread per worker (ENTROPY_PROBE_CPU_THREADS=1). In each round, J jobs (the benchmark model of
bench/common.py, random client rollouts) are submitted at once to one server and timed from the
first submit to the last finish, then the same to the other; rounds alternate so that a change
in the host's load hits both. Then, on the 2-worker server, one job alone with `workers: 1` and
the same job with `workers: 2` (its units sharded over both), timed from submit to finish, in
alternating order. A warm-up job per worker loads the base before the clock starts.

    python -m bench.scale [--jobs 8] [--prompts 16] [--rounds 3] [--backend local|ray|both]

On a machine with fewer free cores than workers the ratios measure the contention, not the
pool: the output prints the cores and the load average beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from bench.common import add_model_args, client_rollouts, resolve_model_args
from service.demo import free_port

READY_TIMEOUT_S = 300.0
POLL_S = 0.2


def job_body(base: str, adapter: str, args, seed: int) -> dict:
    rollouts = client_rollouts(args.prompts, args.group, args.tokens, args.vocab, seed)
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "rollouts": [dataclasses.asdict(r) for r in rollouts],
            "reward": {"kind": "provided"}, "seed": seed,
            "memory": {"teacher_force_microbatch_size": args.microbatch}}


class Server:
    def __init__(self, workers: int, backend: str, roots: str, state: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = dict(os.environ, ENTROPY_PROBE_DEVICES=",".join(["cpu"] * workers),
                   ENTROPY_PROBE_BACKEND=backend, ENTROPY_PROBE_CPU_THREADS="1",
                   ENTROPY_PROBE_CHECKPOINT_ROOTS=roots, ENTROPY_PROBE_STATE_DIR=state,
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", self.url.rsplit(":", 1)[1],
             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self._wait_workers(workers)

    def _wait_workers(self, n: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                workers = self.http.get("/readyz").json().get("workers", [])
                if sum(w["state"] == "idle" for w in workers) >= n:
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(POLL_S)
        raise TimeoutError("workers not ready")

    def run(self, bodies: list[dict]) -> float:
        """Submit every body at once; seconds until the last one finished."""
        t0 = time.perf_counter()
        ids = [self.http.post("/probes", json=b).json()["id"] for b in bodies]
        pending = set(ids)
        while pending:
            for job_id in list(pending):
                job = self.http.get(f"/probes/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                    pending.discard(job_id)
            time.sleep(POLL_S)
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(60)


@dataclasses.dataclass
class Figures:
    rates: dict[int, list[float]]           # pool size → jobs per minute, per round
    latency: dict[int, list[float]]         # request workers → seconds of one job, per round


def measure(backend: str, base: str, adapter: str, args) -> Figures:
    """Jobs per minute of 1 and 2 workers, and one job's latency with workers 1 and 2 on the
    2-worker server, args.rounds times each, alternating (so a change in the host's load hits
    both alike)."""
    fig = Figures({1: [], 2: []}, {1: [], 2: []})
    with tempfile.TemporaryDirectory() as state:
        roots = os.path.dirname(os.path.dirname(base))
        servers = {n: Server(n, backend, roots, os.path.join(state, str(n))) for n in fig.rates}
        try:
            for n, server in servers.items():        # every worker loads the base once
                server.run([job_body(base, adapter, args, 1000 + i) for i in range(n)])
            for r in range(args.rounds):
                for n, server in servers.items():
                    bodies = [job_body(base, adapter, args, r * args.jobs + i)
                              for i in range(args.jobs)]
                    fig.rates[n].append(60.0 * args.jobs / server.run(bodies))
                one_job = job_body(base, adapter, args, 2000 + r)
                for k in ((1, 2) if r % 2 == 0 else (2, 1)):
                    fig.latency[k].append(servers[2].run([{**one_job, "workers": k}]))
        finally:
            for server in servers.values():
                server.stop()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", choices=["local", "ray", "both"], default="local")
    args = ap.parse_args()
    base, adapter, model = resolve_model_args(args)
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    print(f"{args.jobs} jobs of {args.prompts} prompts x {args.group} client responses (<= "
          f"{args.tokens} tokens), {model}; CPU workers, 1 thread each; {os.cpu_count()} cores "
          f"on this host, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"medians of {args.rounds} alternating rounds (each round's ratio in brackets)")
    print(f"{'backend':8} {'':26} {'1 worker':>14} {'2 workers':>14} {'ratio':>7}")
    for backend in backends:
        fig = measure(backend, base, adapter, args)
        row(backend, "jobs per minute, pool of", fig.rates, "j/min", higher=True)
        row(backend, "one job's latency, workers:", fig.latency, "s", higher=False)


def row(backend: str, what: str, values: dict[int, list[float]], unit: str, higher: bool
        ) -> None:
    """One line: the medians for 1 and 2, and 2's speed-up over 1 (>1: 2 is better)."""
    one, two = statistics.median(values[1]), statistics.median(values[2])
    speedup = (lambda a, b: b / a) if higher else (lambda a, b: a / b)
    rounds = " ".join(f"{speedup(a, b):.2f}" for a, b in zip(values[1], values[2]))
    print(f"{backend:8} {what:26} {one:9.2f} {unit:5} {two:9.2f} {unit:5} "
          f"{speedup(one, two):6.2f}x  [{rounds}]  load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
