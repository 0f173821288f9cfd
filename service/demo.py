"""`entropy-probe demo`: tiny checkpoint → `entropy-probe serve` on a free local port → one job
over HTTP with progress → a short summary → server stopped."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx

DEMO_PROMPTS = ["1+2=", "3+1=", "2+2=", "0+4=", "4+1=", "2+3="]
READY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_request(base: str, adapter: str) -> dict:
    """Client rollouts with provided rewards that vary within each prompt, so the advantages
    (and the gradient term) are non-zero. They are written by hand, not sampled from the tiny
    policy; it is close to uniform, so they still look typical of it (batch.on_policy_z about
    −0.5: no off-policy warning), as they would not under a trained model."""
    rng = random.Random(0)
    rollouts = []
    for prompt in DEMO_PROMPTS:
        a, b = prompt.rstrip("=").split("+")
        right = str(int(a) + int(b))
        responses = [right, str(rng.randint(0, 9)), f"{right} ?", "#"]
        rollouts.append({"prompt": prompt, "responses": responses,
                         "rewards": [1.0, 0.0, 0.5, 0.0]})
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "rollouts": rollouts, "reward": {"kind": "provided"},
            "realized": {"lr_multipliers": [1.0, 0.5]}, "seed": 0}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the server was not ready within {timeout:g} s")


def run_demo(checkpoint_dir: str) -> int:
    from probe_core.tiny import write_tiny_checkpoint
    from service.client import ProbeClient, ProbeFailed
    from service.summary import progress_line, summarize

    ck = os.path.abspath(checkpoint_dir)
    base, adapter = os.path.join(ck, "base"), os.path.join(ck, "adapter")
    if os.path.isfile(os.path.join(adapter, "optimizer.pt")):
        print(f"[demo] reusing the tiny checkpoint in {ck}", file=sys.stderr)
    else:
        print(f"[demo] writing a tiny checkpoint to {ck}", file=sys.stderr)
        base, adapter = write_tiny_checkpoint(ck)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="entropy-probe-demo-") as state:
        env = dict(os.environ, ENTROPY_PROBE_STATE_DIR=state, ENTROPY_PROBE_CHECKPOINT_ROOTS=ck)
        env.pop("ENTROPY_PROBE_API_TOKEN", None)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
               "--log-level", "warning"]
        print(f"[demo] starting the service on {url}", file=sys.stderr)
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_ready(url, proc, READY_TIMEOUT_S)
            with ProbeClient(url) as client:
                job_id = client.submit(demo_request(base, adapter))
                print(f"[demo] job {job_id} submitted", file=sys.stderr)
                result = client.wait(job_id, JOB_TIMEOUT_S, poll=0.2, on_progress=lambda p:
                                     progress_line(p.phase, p.done, p.total))
                print(file=sys.stderr)
        except ProbeFailed as exc:
            print(f"[demo] {exc}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(summarize(result))
    return 0
