"""What several test modules share: the `entropy-probe serve` subprocess, request bodies, polling,
the reliability figures, and the directory of broken checkpoints. Fixtures built on these live in
conftest.py; no test module imports another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from schemas import ProbeJob
from service.demo import free_port

READY_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 120.0
# Tiny models on a shared CPU: torch's OpenMP threads spin against other processes and make
# each op ~20x slower; one thread per worker is faster and predictable.
ONE_THREAD = "1"
RELIABILITY_TOKEN = "reliability-token"
RELIABILITY_AUTH = {"Authorization": f"Bearer {RELIABILITY_TOKEN}"}


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class Server:
    """One `entropy-probe serve` subprocess; with fault_hook='kind:phase', the test-only
    fault_server instead (tests/faults.py: the fault hits jobs whose seed is 424242)."""

    def __init__(self, cwd: Path, state_dir: Path, roots: str, token: str | None = None,
                 fault_hook: str | None = None, **env: str):
        self.port, self.token, self.cwd = free_port(), token, cwd
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, ENTROPY_PROBE_STATE_DIR=str(state_dir),
                        ENTROPY_PROBE_CHECKPOINT_ROOTS=roots, ENTROPY_PROBE_DEVICE="cpu",
                        OMP_NUM_THREADS=ONE_THREAD,
                        **{f"ENTROPY_PROBE_{k.upper()}": v for k, v in env.items()})
        self.env.pop("ENTROPY_PROBE_API_TOKEN", None)
        if token:
            self.env["ENTROPY_PROBE_API_TOKEN"] = token
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (TESTS_DIR, os.path.dirname(TESTS_DIR), self.env.get("PYTHONPATH")) if p)
        command = ["service.cli", "serve"] if fault_hook is None else [
            "fault_server", "--fault", fault_hook]
        self.log = open(cwd / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--port", str(self.port), "--log-level",
             "warning"], cwd=cwd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30.0, headers=self.auth())

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self):
        from service.client import ProbeClient
        return ProbeClient(self.url, token=self.token)

    def ready_pids(self) -> list[int]:
        """Pids of the ready (idle or busy) workers, from /readyz ([] while none is)."""
        try:
            r = self.http.get("/readyz", timeout=2.0)
        except httpx.TransportError:
            return []
        return [w["pid"] for w in r.json().get("workers", [])
                if w["state"] in ("idle", "busy")] if r.status_code in (200, 503) else []

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, not_pid: int | None = None,
                   workers: int = 1) -> int:
        """Poll /readyz until `workers` workers are ready, none of them not_pid; returns the
        first one's pid."""
        return self.wait_workers(workers, timeout, not_pid)[0]

    def wait_workers(self, n: int, timeout: float = READY_TIMEOUT_S,
                     not_pid: int | None = None) -> list[int]:
        """Poll /readyz until n workers are ready (none of them not_pid); their pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.read_log()[-2000:]}"
            pids = self.ready_pids()
            if len(pids) >= n and not_pid not in pids:
                return pids
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s: {self.read_log()[-2000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.cwd / f"server-{self.port}.log").read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# -- request bodies ---------------------------------------------------------------------------

def quick_request(ck: tuple[str, str], seed: int = 0, **extra) -> dict:
    """Client rollouts with provided rewards varying within each prompt (non-zero advantages)."""
    base, adapter = ck
    rollouts = [{"prompt": p, "responses": [a, "7", f"{a} ?", "#"],
                 "rewards": [1.0, 0.0, 0.5, 0.0]}
                for p, a in (("1+2=", "3"), ("3+1=", "4"), ("2+2=", "4"), ("0+4=", "4"))]
    return {"checkpoint": {"base_model": base, "adapter": adapter}, "rollouts": rollouts,
            "reward": {"kind": "provided"}, "seed": seed, **extra}


def slow_request(ck: tuple[str, str]) -> dict:
    """Sampled rollouts, 256 sequences of up to 48 tokens, one sequence per chunk: seconds of
    work with many chunk boundaries. Tests cancel or kill it; it never runs to the end."""
    base, adapter = ck
    pairs = [(a, b) for a in range(5) for b in range(5)][:16]
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "prompts": [f"{a}+{b}=" for a, b in pairs],
            "answers": [str(a + b) for a, b in pairs], "responses_per_prompt": 16,
            "generation": {"max_new_tokens": 48, "batch_size": 4},
            "memory": {"teacher_force_microbatch_size": 1},
            "realized": {"lr_multipliers": [1.0, 0.5, 2.0]}}


def medium_request(ck: tuple[str, str], seed: int = 0) -> dict:
    """Sampled rollouts, 64 sequences of up to 12 tokens: a few seconds on one thread."""
    base, adapter = ck
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(2)]
    return {"checkpoint": {"base_model": base, "adapter": adapter}, "prompts": prompts,
            "answers": [str(eval(p[:-1])) for p in prompts], "responses_per_prompt": 8,
            "generation": {"max_new_tokens": 12}, "seed": seed}


def prompts_request(ck: tuple[str, str], seed: int = 0, **extra) -> dict:
    """A small sampled job: 2 prompts x 2 responses of at most 2 tokens."""
    base, adapter = ck
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "prompts": ["1+2=", "2+2="], "answers": ["3", "4"], "responses_per_prompt": 2,
            "generation": {"max_new_tokens": 2}, "seed": seed, **extra}


def rollouts(*groups: tuple[list, list]) -> list[dict]:
    """Client rollouts, one (responses, rewards) pair per prompt."""
    return [{"prompt": f"{i}+1=", "responses": r, "rewards": w} for i, (r, w) in enumerate(groups)]


# -- a pool of two CPU workers ----------------------------------------------------------------

def pool_server(tmp: Path, roots: str, backend: str, **env: str) -> Server:
    """A server with two CPU workers, one thread each: processes (local) or actors on a local
    Ray the server starts (ray); returned once both are ready."""
    server = Server(tmp, tmp / "state", roots, devices="cpu,cpu", cpu_threads="1",
                    backend=backend, **env)
    try:
        server.wait_workers(2)
    except BaseException:
        server.stop()
        raise
    return server


def submit(server: Server, body: dict) -> str:
    r = server.http.post("/probes", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def finished(server: Server, job_id: str) -> ProbeJob:
    return poll(server, job_id, lambda j: j.status.finished, JOB_TIMEOUT_S)


def readyz_workers(server: Server) -> list[dict]:
    r = server.http.get("/readyz")
    assert r.status_code == 200, r.text
    return r.json()["workers"]


# -- polling ----------------------------------------------------------------------------------

def poll(server: Server, job_id: str, until, timeout: float = JOB_TIMEOUT_S) -> ProbeJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = server.http.get(f"/probes/{job_id}")
        assert r.status_code == 200, r.text
        job = ProbeJob.model_validate(r.json())
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the expected state: {r.json()}")


def wait_running(server: Server, job_id: str) -> ProbeJob:
    """Until the worker is inside the probe (past loading), so a cancel or kill hits mid-run."""
    return poll(server, job_id, lambda j: j.status.finished or j.progress.phase in (
        "rollouts", "teacher_forcing", "gradients"))


def worker_children(server: Server) -> list[psutil.Process]:
    """Live worker processes of the server (not multiprocessing's resource tracker)."""
    out = []
    for p in psutil.Process(server.proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:             # it exited while we looked
            pass
    return out


# -- reliability: counted requests, no stack traces, no host paths ----------------------------

FIGURES: Counter = Counter()      # printed at the end of each reliability module
FIGURE_NAMES = ("requests", "faults", "failures", "jobs_accepted", "jobs_lost", "fuzz_requests",
                "load_requests", "load_429", "load_jobs")


def figures_line(module: str, tests_failed: int) -> str:
    f = {k: FIGURES.get(k, 0) for k in FIGURE_NAMES}
    return (f"[{module}] requests={f['requests']} faults_injected={f['faults']} "
            f"failures={f['failures']} jobs_accepted={f['jobs_accepted']} "
            f"jobs_lost={f['jobs_lost']} (fuzz={f['fuzz_requests']}, load={f['load_requests']}, "
            f"load 429s={f['load_429']}, load jobs={f['load_jobs']}); "
            f"tests failed in this session: {tests_failed}")


def private_paths(server: Server) -> list[str]:
    """Host paths a client did not send and must never see: the server's working and state
    directories, the source tree, the interpreter, the user's cache, and any the test adds
    (`server.private`, e.g. where symlinks in a root lead)."""
    return [str(server.cwd), str(Path(server.env["ENTROPY_PROBE_STATE_DIR"]).resolve()),
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.prefix,
            sys.base_prefix, os.path.expanduser("~/.cache"), *getattr(server, "private", [])]


def assert_clean(text: str, server: Server) -> None:
    for needle in ("Traceback", 'File "', "site-packages", *private_paths(server)):
        assert needle not in text, f"{needle!r} leaked into a response: {text[:500]}"


def request(server: Server, method: str, path: str, **kw) -> httpx.Response:
    """One counted request; never a 5xx, never a leak."""
    r = server.http.request(method, path, **kw)
    FIGURES["requests"] += 1
    assert r.status_code < 500, (method, path, r.status_code, r.text[:500])
    assert r.headers.get("x-request-id")
    assert_clean(r.text, server)
    return r


def wait_job(server: Server, job_id: str) -> ProbeJob:
    job = poll(server, job_id, lambda j: j.status.finished)
    assert_clean(job.model_dump_json(), server)
    if job.error is not None:           # the server's own words: no terminal escapes either
        assert not any(c < " " and c not in "\n\t" for c in job.error.message), job.error
    return job


# -- a directory of broken checkpoints --------------------------------------------------------

class _MarkerOnLoad:
    """Unpickling this creates a file: a stand-in for code a malicious optimizer.pt would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _param_count(path: str) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() for t in load_file(path).values())


def write_broken_checkpoints(root: Path, outside: Path,
                             tiny_checkpoint: tuple[str, str]) -> dict[str, Path]:
    """Checkpoints that fail in every way a user can cause, built from real tiny ones under
    `root`; `outside` is a directory outside every checkpoint root."""
    import torch

    from probe_core.tiny import TinyConfig, write_tiny_checkpoint
    base, adapter = map(Path, tiny_checkpoint)
    write_tiny_checkpoint(str(root / "rank8"), TinyConfig(lora_rank=8))
    write_tiny_checkpoint(str(root / "wide"), TinyConfig(hidden_size=48))
    d = {"root": root, "outside": outside, "marker": outside / "unpickled.marker",
         "remote_marker": outside / "remote-code.marker"}

    def adapter_copy(name: str) -> Path:
        shutil.copytree(adapter, root / name)
        return root / name

    def base_copy(name: str) -> Path:
        shutil.copytree(base, root / name)
        return root / name

    os.remove(adapter_copy("no_optimizer") / "optimizer.pt")
    (adapter_copy("garbage_optimizer") / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip")
    real = (adapter / "optimizer.pt").read_bytes()
    (adapter_copy("truncated_optimizer") / "optimizer.pt").write_bytes(real[:len(real) // 2])
    torch.save({"state": {}, "param_groups": [], "x": _MarkerOnLoad(str(d["marker"]))},
               adapter_copy("pickle_optimizer") / "optimizer.pt")
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["eps"] = float("inf")
    torch.save(state, adapter_copy("inf_eps_optimizer") / "optimizer.pt")
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    for moments in state["state"].values():          # a run that diverged before it was saved
        moments["exp_avg"].fill_(float("nan"))
    torch.save(state, adapter_copy("nan_moments_optimizer") / "optimizer.pt")
    (adapter_copy("garbage_adapter") / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    # Pickled weights instead of safetensors, carrying code: loaders must refuse to run it.
    pickled = adapter_copy("pickle_adapter")
    os.remove(pickled / "adapter_model.safetensors")
    torch.save({"x": _MarkerOnLoad(str(d["marker"]))}, pickled / "adapter_model.bin")
    pickled = base_copy("pickle_base")
    os.remove(pickled / "model.safetensors")
    torch.save({"x": _MarkerOnLoad(str(d["marker"]))}, pickled / "pytorch_model.bin")
    (adapter_copy("garbage_adapter_config") / "adapter_config.json").write_text("{not json")
    (base_copy("garbage_tokenizer") / "tokenizer.json").write_text("{not json")
    (base_copy("garbage_config") / "config.json").write_text("{not json")
    weights = base_copy("truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A model that needs its own code, which would leave a marker if it ever ran.
    remote = base_copy("remote_code")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(d['remote_marker'])!r}, 'w').write('ran')\n")
    # Symlinks inside a root that resolve outside it.
    shutil.copytree(adapter, outside / "adapter")
    os.symlink(outside / "adapter", root / "link_to_outside")
    os.symlink(outside / "adapter" / "optimizer.pt", root / "optimizer_link.pt")
    d["limit"] = (_param_count(str(adapter / "adapter_model.safetensors"))
                  + _param_count(str(base / "model.safetensors"))) // 2
    return d


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of /metrics samples called `name` whose labels include `labels`, read with
    prometheus_client's parser (so the text must parse)."""
    from prometheus_client.parser import text_string_to_metric_families
    r = server.http.get("/metrics")
    assert r.status_code == 200, r.text
    found = [smp.value for fam in text_string_to_metric_families(r.text) for smp in fam.samples
             if smp.name == name and labels.items() <= smp.labels.items()]
    assert found, f"{name} {labels} not in /metrics:\n{r.text}"
    return sum(found)
