"""Shared fixtures: a tiny real checkpoint, and real `entropy-probe serve` processes on
127.0.0.1 (free port, own state dir) that are always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.demo import free_port

READY_TIMEOUT_S = 90.0
# Tiny models on a shared CPU: torch's OpenMP threads spin against other processes and make
# each op ~20x slower; one thread per worker is faster and predictable.
ONE_THREAD = "1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """(base_dir, adapter_dir) of a tiny real Llama + LoRA + AdamW state; its parent is the
    checkpoint root of the test servers."""
    from probe_core.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


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

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, not_pid: int | None = None) -> int:
        """Poll /readyz until 200 (with a worker pid other than not_pid); returns the pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.read_log()[-2000:]}"
            try:
                r = self.http.get("/readyz", timeout=2.0)
                if r.status_code == 200 and r.json()["worker_pid"] != not_pid:
                    return r.json()["worker_pid"]
            except httpx.TransportError:
                pass
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


@pytest.fixture
def start_server(tmp_path, tiny_checkpoint):
    """Factory: start_server(state_dir=None, token=None, **ENV) → a ready Server."""
    servers: list[Server] = []
    roots = os.path.dirname(tiny_checkpoint[0])

    def start(state_dir: Path | None = None, token: str | None = None, wait: bool = True,
              **env: str) -> Server:
        server = Server(tmp_path, state_dir or tmp_path / "state", roots, token, **env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, tiny_checkpoint, request):
    """A server shared by a test module; options from the module's SERVER_ENV dict."""
    tmp = tmp_path_factory.mktemp("server")
    env = dict(getattr(request.module, "SERVER_ENV", {}))
    token = env.pop("api_token", None)
    server = Server(tmp, tmp / "state", os.path.dirname(tiny_checkpoint[0]), token, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
