"""Throughput of a worker pool: jobs per minute with 1 and 2 workers, side by side, in one run.

Each configuration is a fresh `entropy-probe serve` with ENTROPY_PROBE_DEVICES=cpu (or cpu,cpu),
one torch thread per worker (ENTROPY_PROBE_CPU_THREADS=1); the same J jobs (the benchmark model
of bench/common.py, random client rollouts) are submitted at once and timed from the first
submit to the last finish. The first job of each worker loads the base; a warm-up job per worker
runs before the clock starts so that every timed job reuses it.

    python -m bench.scale [--jobs 8] [--prompts 16] [--backend local|ray|both]

On a machine with fewer free cores than workers the ratio measures the contention, not the
pool: the output prints the cores beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import httpx

from bench.common import add_model_args, checkpoint, client_rollouts
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


def measure(workers: int, backend: str, base: str, adapter: str, args) -> float:
    """Jobs per minute of `workers` workers on args.jobs jobs."""
    with tempfile.TemporaryDirectory() as state:
        server = Server(workers, backend, os.path.dirname(os.path.dirname(base)), state)
        try:
            server.run([job_body(base, adapter, args, 1000 + i) for i in range(workers)])
            seconds = server.run([job_body(base, adapter, args, i) for i in range(args.jobs)])
        finally:
            server.stop()
    return 60.0 * args.jobs / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--backend", choices=["local", "ray", "both"], default="local")
    args = ap.parse_args()
    base, adapter = checkpoint(args.hidden, args.layers, args.rank, args.vocab)
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    print(f"{args.jobs} jobs of {args.prompts} prompts x {args.group} client responses (<= "
          f"{args.tokens} tokens), hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}, LoRA r={args.rank}; CPU workers, 1 thread each; "
          f"{os.cpu_count()} cores on this host")
    print(f"{'backend':8} {'1 worker':>14} {'2 workers':>14} {'ratio':>7}")
    for backend in backends:
        one = measure(1, backend, base, adapter, args)
        two = measure(2, backend, base, adapter, args)
        print(f"{backend:8} {one:9.2f} j/min {two:9.2f} j/min {two / one:6.2f}x")


if __name__ == "__main__":
    main()
