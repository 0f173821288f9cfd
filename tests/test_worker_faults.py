"""Worker and server faults: the worker killed while idle, while starting and mid-job; a stop
while a dead worker waits for its successor; a restart after a graceful stop mid-job; a result
that does not fit the schema. Nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import (FIGURES, metric, prompts_request, request, slow_request, wait_job,
                     wait_running, worker_children)
from schemas import ErrorCode, JobStatus

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("report_figures")]


def test_worker_killed_idle_starting_and_mid_job_nothing_lost(start_server, tiny_checkpoint):
    server = start_server()
    first = server.wait_ready()
    os.kill(first, signal.SIGTERM)                       # idle
    FIGURES["faults"] += 1
    deadline = time.monotonic() + 60
    starting = []
    while not starting and time.monotonic() < deadline:  # kill its replacement while it starts
        starting = [p for p in worker_children(server) if p.pid != first]
        time.sleep(0.01)
    assert starting, "no replacement worker was started"
    starting[0].kill()
    FIGURES["faults"] += 1
    starting[0].wait(30)                                 # gone (the supervisor reaps it)
    third = server.wait_ready(not_pid=starting[0].pid)
    assert third not in (first, starting[0].pid)

    slow = request(server, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    behind = [request(server, "POST", "/probes", json=prompts_request(tiny_checkpoint, seed=s))
              .json()["id"] for s in (1, 2)]
    FIGURES["jobs_accepted"] += 3
    assert wait_running(server, slow).status == JobStatus.running
    os.kill(third, signal.SIGKILL)                       # mid-job
    FIGURES["faults"] += 1
    crashed = wait_job(server, slow)
    assert crashed.status == JobStatus.failed and crashed.error.code == ErrorCode.worker_crashed
    assert "SIGKILL" in crashed.error.message and crashed.error.phase
    for job_id in behind:                                # the queued jobs were not lost
        job = wait_job(server, job_id)
        assert job.status == JobStatus.succeeded, job.error
    assert server.wait_ready() not in (first, third)
    assert metric(server, "entropy_probe_worker_restarts_total") == 3


def test_stop_while_a_dead_worker_waits_to_be_replaced(start_server, tiny_checkpoint):
    """SIGTERM in the second after a worker died (before its successor starts): a clean
    shutdown, and the job queued meanwhile is reported interrupted after the restart."""
    server = start_server()
    os.kill(server.wait_ready(), signal.SIGKILL)
    FIGURES["faults"] += 2
    deadline = time.monotonic() + 30
    while "died (killed by SIGKILL)" not in server.read_log():
        assert time.monotonic() < deadline, server.read_log()[-2000:]
        time.sleep(0.01)
    queued = request(server, "POST", "/probes", json=prompts_request(tiny_checkpoint))
    server.proc.terminate()
    server.proc.wait(30)
    log = server.read_log()
    assert "Traceback" not in log and "shutdown failed" not in log, log[-3000:]
    again = start_server(state_dir=Path(server.env["ENTROPY_PROBE_STATE_DIR"]))
    job = request(again, "GET", f"/probes/{queued.json()['id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "interrupted"
    FIGURES["jobs_accepted"] += 1


# -- 4d. restart: a graceful stop mid-job loses nothing --------------------------------------

def test_restart_after_a_graceful_stop_mid_job(start_server, tiny_checkpoint, tmp_path):
    """The finished job is served as it was; the running and the queued one are interrupted,
    neither finished nor silently dropped. (Damaged first-round files: test_store.py.)"""
    state = tmp_path / "stopped-state"
    first = start_server(state_dir=state)
    done_id = request(first, "POST", "/probes", json=prompts_request(tiny_checkpoint)).json()["id"]
    done = wait_job(first, done_id)
    assert done.status == JobStatus.succeeded
    slow_id = request(first, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    queued_id = request(first, "POST", "/probes", json=prompts_request(tiny_checkpoint,
                                                                       seed=8)).json()["id"]
    wait_running(first, slow_id)
    first.stop()                                    # SIGTERM: a graceful stop mid-job
    FIGURES["faults"] += 1

    second = start_server(state_dir=state)
    again = request(second, "GET", f"/probes/{done_id}").json()
    assert again["status"] == "succeeded" and again["result"] == json.loads(
        done.model_dump_json())["result"]
    for job_id in (slow_id, queued_id):            # neither finished nor silently dropped
        job = request(second, "GET", f"/probes/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
    listed = [j["id"] for j in request(second, "GET", "/probes").json()["data"]]
    assert listed == [queued_id, slow_id, done_id]
    new = request(second, "POST", "/probes", json=prompts_request(tiny_checkpoint, seed=3))
    FIGURES["jobs_accepted"] += 4
    assert wait_job(second, new.json()["id"]).status == JobStatus.succeeded


class ScriptedWorker:
    """A worker channel that hands the supervisor prepared messages and records what it was
    sent: the supervisor's bookkeeping without a process."""

    def __init__(self, messages: list):
        self.messages, self.sent = messages, []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def poll(self) -> list:
        return [self.messages.pop(0)] if self.messages else []

    def cancel(self, job_id: str) -> None:
        pass

    def alive(self) -> bool:
        return True

    def stop(self, timeout: float = 5.0) -> None:
        pass


def test_a_result_that_does_not_fit_the_schema_fails_the_job_and_frees_the_worker(tmp_path):
    """Were the supervisor to stop on such a result, the job would stay `running` and every
    later one `queued`, for ever. Real store, real supervisor loop steps."""
    from probe_core.spec import RuntimeOptions
    from schemas import ProbeRequest as Req
    from service import worker as w
    from service.metrics import Metrics
    from service.pool import Backend
    from service.store import JobStore
    from service.supervisor import Supervisor

    store = JobStore(tmp_path / "state")
    body = prompts_request(("base", "adapter"))
    ids = [store.create(Req.model_validate(dict(body, seed=s)), None, 8)[0].id for s in (1, 2)]
    channel = ScriptedWorker([w.Ready(1, "cpu", 1)])
    backend = Backend("scripted", [("cpu", w.WorkerConfig(RuntimeOptions(device="cpu"), 0))],
                      spawn=lambda _index, _cfg: channel)
    sup = Supervisor(store, backend, Metrics())
    sup.slots[0].handle = channel
    sup._step()                                       # ready → the first job is sent
    assert [m.id for m in channel.sent] == ids[:1]
    channel.messages.append(w.JobDone(ids[0], '{"delta_h1": {"total": null}}', False))
    sup._step()
    job = store.get(ids[0])
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.internal_error
    assert [m.id for m in channel.sent] == ids       # and the worker took the next one
    assert store.get(ids[1]).status == JobStatus.running
