"""Per-job deadlines (request timeout_s, ENTROPY_PROBE_MAX_JOB_SECONDS) and the worker's CPU
threads (ENTROPY_PROBE_CPU_THREADS), on a real server with real worker processes, then Ray actors.

A job past its deadline stops at the next chunk boundary: the same worker takes the next job.
A job that reaches no boundary (the test-only `hang` fault, seed 424242) is killed with its
worker after the grace period; it fails with deadline_exceeded too, and a new worker serves the
next job normally.
"""

from __future__ import annotations

import os

import pytest

from faults import FAULT_SEED
from helpers import JOB_TIMEOUT_S, Server, poll, quick_request, slow_request
from probe_core.probe import PHASES
from schemas import ErrorCode, JobStatus
from service.supervisor import Deadlines

GRACE_S = 10.0     # generous: on a loaded CPU a chunk can take seconds
SERVER_ENV = {"fault_hook": "hang:rollouts", "deadline_grace_seconds": str(GRACE_S),
              "max_job_seconds": "600", "cpu_threads": "2"}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["local", "ray"])
def module_server(request, tmp_path_factory, tiny_checkpoint):
    """The module's server with local worker processes, then with Ray actors (the fault reaches
    the actor too: its entry point is tests/faults.py's)."""
    if request.param == "ray":
        pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    tmp = tmp_path_factory.mktemp(f"deadline-{request.param}")
    server = Server(tmp, tmp / "state", os.path.dirname(tiny_checkpoint[0]),
                    backend=request.param, **SERVER_ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def finished(server, job_id: str):
    return poll(server, job_id, lambda j: j.status.finished)


def test_timeout_s_is_capped_by_the_server_ceiling():
    assert Deadlines(None).of(None) is None
    assert Deadlines(None).of(5.0) == 5.0
    assert Deadlines(60.0).of(None) == 60.0          # the default
    assert Deadlines(60.0).of(5.0) == 5.0
    assert Deadlines(60.0).of(3600.0) == 60.0        # the ceiling


@pytest.mark.parametrize("bad", [0, -1.0, "soon", 1e12])
def test_timeout_s_must_be_positive_and_bounded(module_server, tiny_checkpoint, bad):
    r = module_server.http.post("/probes", json=quick_request(tiny_checkpoint, timeout_s=bad))
    assert r.status_code == 422
    assert any(e["loc"] == ["body", "timeout_s"] for e in r.json()["detail"]), r.text


def test_readyz_reports_the_cpu_threads_setting(module_server):
    assert module_server.http.get("/readyz").json()["workers"][0]["cpu_threads"] == 2


def test_a_job_past_its_deadline_stops_at_a_chunk_boundary(module_server, tiny_checkpoint):
    pid = module_server.wait_ready()
    with module_server.client() as client:           # the base is loaded: the next load is short
        client.wait(client.submit(quick_request(tiny_checkpoint, seed=2)), JOB_TIMEOUT_S,
                    poll=0.1)
    # 4 sequences of <= 8 tokens per generate(): chunks stay short even when the two threads
    # fight other processes for the cores (48-token chunks took ~5 s each then)
    body = {**slow_request(tiny_checkpoint), "responses_per_prompt": 4, "timeout_s": 0.5,
            "generation": {"max_new_tokens": 8, "batch_size": 4}}
    r = module_server.http.post("/probes", json=body)
    job = finished(module_server, r.json()["id"])
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.deadline_exceeded
    assert job.error.phase in PHASES
    assert "0.5 s" in job.error.message and "chunk boundary" in job.error.message
    assert job.error.memory_trace[-1].phase == job.error.phase      # ends where it stopped
    assert (job.finished_at - job.started_at).total_seconds() < 0.5 + GRACE_S
    assert module_server.wait_ready() == pid          # stopped by itself: the same worker
    with module_server.client() as client:           # and the next job runs normally
        result = client.wait(client.submit(quick_request(tiny_checkpoint, seed=3)),
                             JOB_TIMEOUT_S, poll=0.1)
    assert result.delta_h1.units == 4


def test_a_worker_that_reaches_no_boundary_is_killed_and_replaced(module_server,
                                                                   tiny_checkpoint):
    pid = module_server.wait_ready()
    r = module_server.http.post("/probes", json=quick_request(
        tiny_checkpoint, seed=FAULT_SEED, timeout_s=1.0))
    job = finished(module_server, r.json()["id"])
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.deadline_exceeded
    assert job.error.phase == "rollouts" and "killed" in job.error.message
    assert module_server.wait_ready(not_pid=pid) != pid
    with module_server.client() as client:
        result = client.wait(client.submit(quick_request(tiny_checkpoint, seed=4)),
                             JOB_TIMEOUT_S, poll=0.1)
    assert result.delta_h1.units == 4
