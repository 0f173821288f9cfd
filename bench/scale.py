"""Throughput of a worker pool: jobs per minute with 1 and 2 workers, side by side, in one run.

Two `entropy-probe serve` run side by side, ENTROPY_PROBE_DEVICES=cpu and cpu,cpu, one torch
thread per worker (ENTROPY_PROBE_CPU_THREADS=1). In each round, J jobs (the benchmark model of
bench/common.py, random client rollouts) are submitted at once to one server and timed from the
first submit to the last finish, then the same to the other; rounds alternate so that a change
in the host's load hits both. A warm-up job per worker loads the base before the clock starts.

    python -m bench.scale [--jobs 8] [--prompts 16] [--rounds 3] [--backend local|ray|both]

On a machine with fewer free cores than workers the ratio measures the contention, not the
pool: the output prints the cores beside it.
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


def measure(backend: str, base: str, adapter: str, args) -> dict[int, list[float]]:
    """Jobs per minute of 1 and 2 workers, args.rounds times each, the two servers alternating
    (so a change in the host's load hits both alike)."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as state:
        roots = os.path.dirname(os.path.dirname(base))
        servers = {n: Server(n, backend, roots, os.path.join(state, str(n))) for n in rates}
        try:
            for n, server in servers.items():        # every worker loads the base once
                server.run([job_body(base, adapter, args, 1000 + i) for i in range(n)])
            for r in range(args.rounds):
                for n, server in servers.items():
                    bodies = [job_body(base, adapter, args, r * args.jobs + i)
                              for i in range(args.jobs)]
                    rates[n].append(60.0 * args.jobs / server.run(bodies))
        finally:
            for server in servers.values():
                server.stop()
    return rates


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
    print(f"jobs per minute, median of {args.rounds} alternating rounds (each round's ratio in "
          "brackets)")
    print(f"{'backend':8} {'1 worker':>14} {'2 workers':>14} {'ratio':>7}")
    for backend in backends:
        rates = measure(backend, base, adapter, args)
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        rounds = " ".join(f"{b / a:.2f}" for a, b in zip(rates[1], rates[2]))
        print(f"{backend:8} {one:9.2f} j/min {two:9.2f} j/min {two / one:6.2f}x  [{rounds}]"
              f"  load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
