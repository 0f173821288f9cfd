"""A pool of workers (ENTROPY_PROBE_DEVICES=cpu,cpu): real server, two real worker processes.

- two jobs run at the same time (their running intervals overlap);
- /readyz lists every worker (device, pid, state, base_model);
- a queued job goes to the idle worker that already holds its base model (no reload);
- a worker SIGKILLed mid-job fails that job with worker_crashed naming it, is replaced, and the
  other worker's job succeeds; nothing is lost;
- /metrics parses with prometheus_client's parser and labels its series per worker.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from helpers import (finished, medium_request, metric, pool_server, quick_request,
                     readyz_workers, slow_request, submit, wait_running)
from probe_core.checkpoint import ModelCache
from probe_core.tiny import TinyConfig, write_tiny_checkpoint
from schemas import ErrorCode, JobStatus
from service.pool import pin, worker_devices

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """Another tiny base model (and its adapter): a job on it cannot reuse the first base."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt2")), TinyConfig(seed=1))


@pytest.fixture(scope="module", params=["local", "ray"])
def pool(request, tmp_path_factory, tiny_checkpoint, second_checkpoint):
    """Two CPU workers: processes (local) or actors on a local Ray started by the server (ray;
    one Ray for the module's tests)."""
    if request.param == "ray":
        pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    roots = os.pathsep.join(os.path.dirname(ck[0]) for ck in (tiny_checkpoint,
                                                               second_checkpoint))
    server = pool_server(tmp_path_factory.mktemp(f"pool-{request.param}"), roots,
                         request.param)
    try:
        yield server
    finally:
        server.stop()


def test_devices_setting():
    assert worker_devices(None, "cuda:1") == ["cuda:1"]          # the one-entry form
    assert worker_devices("cpu, cpu", "auto") == ["cpu", "cpu"]
    assert worker_devices("auto", "auto", count_gpus=lambda: 0) == ["cpu"]
    assert worker_devices("auto", "auto", count_gpus=lambda: 3) == ["cuda:0", "cuda:1",
                                                                     "cuda:2"]
    assert pin("cuda:1", None) == ("cuda:0", "1")                # each sees only its own GPU
    assert pin("cuda:1", "4,6") == ("cuda:0", "6")
    assert pin("cpu", "4,6") == ("cpu", "")
    with pytest.raises(ValueError, match="lists 2 GPUs"):
        pin("cuda:2", "4,6")


def test_readyz_lists_every_worker(pool):
    listed = readyz_workers(pool)
    assert [w["device"] for w in listed] == ["cpu", "cpu"]
    assert len({w["pid"] for w in listed}) == 2
    assert {w["state"] for w in listed} <= {"idle", "busy"}
    assert all(w["cpu_threads"] == 1 for w in listed)


def test_two_jobs_run_at_the_same_time(pool, tiny_checkpoint):
    ids = [submit(pool, medium_request(tiny_checkpoint, seed=s)) for s in (1, 2)]
    jobs = [finished(pool, i) for i in ids]
    assert all(j.status == JobStatus.succeeded for j in jobs), [j.error for j in jobs]
    a, b = jobs
    assert a.started_at < b.finished_at and b.started_at < a.finished_at      # overlap
    assert metric(pool, "entropy_probe_job_duration_seconds_count", status="succeeded") >= 2


def test_a_job_goes_to_the_worker_holding_its_base(pool, tiny_checkpoint, second_checkpoint):
    # one worker holds each base (two jobs at once take both workers)
    ids = [submit(pool, medium_request(ck, seed=3)) for ck in (tiny_checkpoint,
                                                               second_checkpoint)]
    assert all(finished(pool, i).status == JobStatus.succeeded for i in ids)
    held = {os.path.realpath(w["base_model"]): w["pid"] for w in readyz_workers(pool)}
    assert set(held) == {os.path.realpath(ck[0]) for ck in (tiny_checkpoint,
                                                            second_checkpoint)}
    loads = metric(pool, "entropy_probe_base_model_loads_total")
    reuses = metric(pool, "entropy_probe_base_model_reuses_total")
    for ck in (second_checkpoint, tiny_checkpoint, second_checkpoint):    # one at a time
        job = finished(pool, submit(pool, quick_request(ck, seed=4)))
        assert job.status == JobStatus.succeeded, job.error
    # each went to the worker holding its base: no load (worker 0, idle too, holds the other)
    assert metric(pool, "entropy_probe_base_model_loads_total") == loads
    assert metric(pool, "entropy_probe_base_model_reuses_total") == reuses + 3
    assert {os.path.realpath(w["base_model"]): w["pid"] for w in readyz_workers(pool)} == held


def test_a_killed_worker_fails_its_job_by_name_and_the_other_goes_on(pool, tiny_checkpoint):
    before = {w["pid"] for w in readyz_workers(pool)}
    ids = [submit(pool, medium_request(tiny_checkpoint, seed=s)) for s in (5, 6)]
    for i in ids:
        wait_running(pool, i)
    victim = next(w for w in readyz_workers(pool) if w["state"] == "busy")
    index = [w["pid"] for w in readyz_workers(pool)].index(victim["pid"])
    os.kill(victim["pid"], signal.SIGKILL)
    jobs = [finished(pool, i) for i in ids]
    crashed = [j for j in jobs if j.status == JobStatus.failed]
    assert len(crashed) == 1 and crashed[0].error.code == ErrorCode.worker_crashed
    assert f"worker {index} (cpu, pid {victim['pid']})" in crashed[0].error.message
    assert "SIGKILL" in crashed[0].error.message
    assert sum(j.status == JobStatus.succeeded for j in jobs) == 1       # the other went on
    after = pool.wait_workers(2, not_pid=victim["pid"])
    assert len(set(after) - before) == 1
    assert metric(pool, "entropy_probe_worker_restarts_total", worker=str(index)) == 1
    assert metric(pool, "entropy_probe_worker_restarts_total", worker=str(1 - index)) == 0
    job = finished(pool, submit(pool, quick_request(tiny_checkpoint, seed=7)))
    assert job.status == JobStatus.succeeded


def test_cancel_reaches_the_right_worker(pool, tiny_checkpoint):
    ids = [submit(pool, slow_request(tiny_checkpoint)),
           submit(pool, medium_request(tiny_checkpoint, seed=9))]
    wait_running(pool, ids[0])
    r = pool.http.post(f"/probes/{ids[0]}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
    first, second = (finished(pool, i) for i in ids)
    assert first.status == JobStatus.cancelled and first.error.code == ErrorCode.cancelled
    assert first.error.phase in ("rollouts", "teacher_forcing", "gradients", "step", "realized")
    assert second.status == JobStatus.succeeded                         # the other went on


def test_metrics_parse_and_label_each_worker(pool):
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(pool.http.get("/metrics").text)}
    assert families["entropy_probe_job_duration_seconds"].type == "histogram"
    up = {s.labels["worker"]: s.value for s in families["entropy_probe_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0}
    buckets = [s for s in families["entropy_probe_job_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    counts = [s for s in families["entropy_probe_job_duration_seconds"].samples
              if s.name.endswith("_count")]
    assert sum(s.value for s in buckets) == sum(s.value for s in counts) > 0
    finished_jobs = sum(metric(pool, "entropy_probe_jobs", status=s) for s in
                        ("succeeded", "failed", "cancelled"))
    assert sum(s.value for s in counts) == finished_jobs
    assert metric(pool, "entropy_probe_queue_depth") == 0


def test_a_path_the_server_cannot_see_is_a_422_that_says_where(pool, tiny_checkpoint):
    body = quick_request(tiny_checkpoint)
    body["checkpoint"]["adapter"] = os.path.join(os.path.dirname(tiny_checkpoint[0]), "gone")
    r = pool.http.post("/probes", json=body)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "checkpoint", "adapter"]
    assert ("every node must see" in error["msg"]) == (pool.env["ENTROPY_PROBE_BACKEND"] == "ray")


def test_a_remote_worker_names_its_host_when_it_cannot_see_a_checkpoint(tiny_checkpoint,
                                                                        tmp_path):
    """A Ray worker on another node reads checkpoints there: the real worker code path, with the
    adapter gone between admission and load."""
    import queue as q
    from dataclasses import replace

    from probe_core.spec import RuntimeOptions
    from service import worker as w

    body = quick_request(tiny_checkpoint)
    body["checkpoint"]["adapter"] = str(tmp_path / "adapter-on-another-node")
    cfg = w.WorkerConfig(RuntimeOptions(device="cpu"), 1 << 20)
    job = w.Job("j1", json.dumps(body))
    for remote in (False, True):
        msg = w._run(job, replace(cfg, remote=remote), ModelCache(), q.Queue(), _Flag(),
                     os.getppid(), None)
        assert msg.code == "checkpoint_not_found"
        assert (os.uname().nodename in msg.message and "shared storage" in msg.message) == remote


class _Flag:
    value = b""
