"""The HTTP service end to end: real `entropy-probe serve` processes, a real worker process,
a tiny real checkpoint. Only 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from faults import FAULT_SEED
from helpers import (JOB_TIMEOUT_S, ONE_THREAD, metric, poll, quick_request, slow_request,
                     wait_running)
from schemas import ErrorCode, JobStatus, ProbeJob, ProbeRequest, ProbeResult
from schemas.result import TracePoint
from service.client import ProbeFailed, ProbeHTTPError

TOKEN = "s3cret-token"
SERVER_ENV = {"api_token": TOKEN, "fault_hook": "oom:gradients", "max_body_bytes": "200000"}
pytestmark = pytest.mark.timeout(300)


def worker_rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# -- the shared server (token, OOM fault hook for seed 424242, small body limit) ---------------

def test_auth_token_required_except_healthz(module_server):
    url = module_server.url
    import httpx
    with httpx.Client(base_url=url) as anon:
        assert anon.get("/healthz").status_code == 200
        for method, path in (("POST", "/probes"), ("GET", "/probes"), ("GET", "/probes/x"),
                             ("GET", "/readyz"), ("GET", "/metrics"),
                             ("POST", "/probes/x/cancel"), ("DELETE", "/probes/x")):
            r = anon.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.headers["x-request-id"]
        wrong = anon.get("/probes", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    ok = module_server.http.get("/probes", headers={"x-request-id": "trace-42"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-42"


def test_submit_poll_succeeds(module_server, tiny_checkpoint):
    r = module_server.http.post("/probes", json=quick_request(tiny_checkpoint))
    assert r.status_code == 202, r.text
    job = ProbeJob.model_validate(r.json())
    assert r.headers["location"] == f"/probes/{job.id}"
    assert job.status == JobStatus.queued and job.result is None
    with module_server.client() as client:
        seen = []
        result = client.wait(job.id, JOB_TIMEOUT_S, poll=0.1, on_progress=seen.append)
    assert isinstance(result, ProbeResult)
    assert result.batch.num_prompts == 4 and result.batch.responses_per_prompt == 4
    assert result.delta_h1.gradient_term != 0.0          # rewards vary within each prompt
    assert result.realized is not None and 0 < result.realized.ess_fraction <= 1
    assert result.memory.trace and result.passes.backward > 0
    assert seen and seen[-1].phase == "done"
    final = module_server.http.get(f"/probes/{job.id}")
    assert final.json()["status"] == "succeeded" and "retry-after" not in final.headers
    assert final.json()["started_at"] and final.json()["finished_at"]


def test_422_schema_error_names_the_field(module_server, tiny_checkpoint):
    body = quick_request(tiny_checkpoint, responses_per_prompt=1)
    body["generation"] = {"max_new_tokens": 0}
    r = module_server.http.post("/probes", json=body)
    assert r.status_code == 422
    locs = [tuple(e["loc"]) for e in r.json()["detail"]]
    assert ("body", "generation", "max_new_tokens") in locs
    assert ("body", "responses_per_prompt") in locs


def test_422_checkpoint_outside_roots_or_missing(module_server, tiny_checkpoint, tmp_path):
    base, adapter = tiny_checkpoint
    outside = dict(quick_request(tiny_checkpoint), checkpoint={"base_model": base,
                                                              "adapter": str(tmp_path)})
    r = module_server.http.post("/probes", json=outside)
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "checkpoint", "adapter"] and "roots" in err["msg"]
    escape = dict(quick_request(tiny_checkpoint),
                  checkpoint={"base_model": base, "adapter": adapter + "/../../.."})
    assert module_server.http.post("/probes", json=escape).status_code == 422
    missing = dict(quick_request(tiny_checkpoint),
                   checkpoint={"base_model": base + "-nope", "adapter": adapter})
    r = module_server.http.post("/probes", json=missing)
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "checkpoint", "base_model"]
    assert err["type"] == "checkpoint_not_found" and "does not exist" in err["msg"]


def test_404_unknown_job(module_server):
    for method, path in (("GET", "/probes/nope"), ("POST", "/probes/nope/cancel"),
                         ("DELETE", "/probes/nope"), ("GET", "/probes?after=nope")):
        r = module_server.http.request(method, path)
        assert r.status_code == 404, (method, path)
        assert "nope" in r.json()["detail"]


def test_413_body_too_large(module_server, tiny_checkpoint):
    body = quick_request(tiny_checkpoint)
    body["rollouts"][0]["prompt"] = "1" * 300_000
    r = module_server.http.post("/probes", json=body)
    assert r.status_code == 413 and r.headers["x-request-id"]


def test_idempotent_resubmission(module_server, tiny_checkpoint):
    body = quick_request(tiny_checkpoint, seed=7)
    key = {"Idempotency-Key": "train-step-1200"}
    first = module_server.http.post("/probes", json=body, headers=key)
    again = module_server.http.post("/probes", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = module_server.http.post("/probes", json=quick_request(tiny_checkpoint, seed=8),
                                    headers=key)
    assert other.status_code == 409
    with module_server.client() as client:
        client.wait(first.json()["id"], JOB_TIMEOUT_S, poll=0.1)
        assert client.submit(body, idempotency_key="train-step-1200") == first.json()["id"]


def test_list_newest_first_with_cursor(module_server, tiny_checkpoint):
    with module_server.client() as client:
        ids = [client.submit(quick_request(tiny_checkpoint, seed=s)) for s in (11, 12)]
        for i in ids:
            client.wait(i, JOB_TIMEOUT_S, poll=0.1)
    page = module_server.http.get("/probes", params={"limit": 1}).json()
    assert page["data"][0]["id"] == ids[1] and page["has_more"] is True
    nxt = module_server.http.get("/probes", params={"limit": 1, "after": ids[1]}).json()
    assert nxt["data"][0]["id"] == ids[0]
    done = module_server.http.get("/probes", params={"status": "succeeded", "limit": 100})
    assert all(j["status"] == "succeeded" for j in done.json()["data"])
    assert module_server.http.get("/probes", params={"limit": 101}).status_code == 422
    assert module_server.http.get("/probes", params={"status": "bogus"}).status_code == 422


def test_delete_finished_job(module_server, tiny_checkpoint):
    with module_server.client() as client:
        job_id = client.submit(quick_request(tiny_checkpoint, seed=3))
        client.wait(job_id, JOB_TIMEOUT_S, poll=0.1)
    assert module_server.http.delete(f"/probes/{job_id}").status_code == 204
    assert module_server.http.get(f"/probes/{job_id}").status_code == 404


def test_probe_error_becomes_a_failed_job(module_server, tiny_checkpoint):
    base, adapter = tiny_checkpoint
    body = quick_request(tiny_checkpoint)
    body["checkpoint"] = {"base_model": base, "adapter": base}   # exists, but not an adapter
    with module_server.client() as client:
        with pytest.raises(ProbeFailed) as failed:
            client.wait(client.submit(body), JOB_TIMEOUT_S, poll=0.1)
    err = failed.value.error
    assert err.code == ErrorCode.checkpoint_not_found and err.phase == "load"
    assert "adapter_config.json" in err.message


def test_oom_fails_the_job_with_trace_and_the_worker_goes_on(module_server, tiny_checkpoint):
    pid = module_server.wait_ready()
    with module_server.client() as client:
        job_id = client.submit(quick_request(tiny_checkpoint, seed=FAULT_SEED))
        with pytest.raises(ProbeFailed) as failed:
            client.wait(job_id, JOB_TIMEOUT_S, poll=0.1)
        err = failed.value.error
        assert failed.value.status == JobStatus.failed
        assert err.code == ErrorCode.out_of_memory and err.phase == "gradients"
        assert err.memory_trace and isinstance(err.memory_trace[0], TracePoint)
        assert err.memory_trace[0].phase and err.memory_trace[0].host_rss_bytes > 0
        assert "microbatch" in err.message
        request = ProbeRequest.model_validate(quick_request(tiny_checkpoint, seed=1))
        after = client.wait(client.submit(request), JOB_TIMEOUT_S, poll=0.1)
    assert after.delta_h1.units == 4
    assert module_server.wait_ready() == pid          # same worker, it did not die


def test_worker_killed_mid_job_fails_it_and_is_replaced(module_server, tiny_checkpoint):
    pid = module_server.wait_ready()
    r = module_server.http.post("/probes", json=slow_request(tiny_checkpoint))
    job_id = r.json()["id"]
    running = wait_running(module_server, job_id)
    assert running.status == JobStatus.running
    os.kill(pid, signal.SIGKILL)
    job = poll(module_server, job_id, lambda j: j.status.finished)
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.worker_crashed
    assert "SIGKILL" in job.error.message and job.error.phase
    new_pid = module_server.wait_ready(not_pid=pid)
    assert new_pid != pid and not psutil.pid_exists(pid)
    with module_server.client() as client:
        result = client.wait(client.submit(quick_request(tiny_checkpoint, seed=2)),
                             JOB_TIMEOUT_S, poll=0.1)
    assert result.delta_h1.units == 4
    assert metric(module_server, "entropy_probe_worker_restarts_total") == 1


def test_metrics_prometheus_text(module_server, tiny_checkpoint):
    with module_server.client() as client:
        client.wait(client.submit(quick_request(tiny_checkpoint, seed=21)), JOB_TIMEOUT_S,
                    poll=0.1)
    r = module_server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE entropy_probe_jobs gauge" in r.text
    for status in JobStatus:                    # the gauges agree with the store
        listed = module_server.http.get("/probes", params={"status": status.value,
                                                           "limit": 100}).json()
        assert not listed["has_more"]
        assert metric(module_server, "entropy_probe_jobs", status=status.value) == len(
            listed["data"]), status
    assert metric(module_server, "entropy_probe_job_duration_seconds_count") >= 1
    assert metric(module_server, "entropy_probe_job_duration_seconds_sum") > 0
    assert metric(module_server, "entropy_probe_peak_host_rss_bytes") > 0
    assert metric(module_server, "entropy_probe_queue_depth") == 0
    assert metric(module_server, "entropy_probe_worker_up") == 1


def test_openapi_documents_the_contract(module_server):
    doc = module_server.http.get("/openapi.json").json()
    assert {"/probes", "/probes/{job_id}", "/probes/{job_id}/cancel", "/healthz", "/readyz",
            "/metrics"} <= set(doc["paths"])
    post = doc["paths"]["/probes"]["post"]
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ProbeJob")
    assert {"ProbeRequest", "ProbeResult", "JobError"} <= set(doc["components"]["schemas"])


# -- own servers ------------------------------------------------------------------------------

def test_sequential_jobs_reuse_base_and_keep_rss_flat(start_server, tiny_checkpoint):
    server = start_server()
    pid = server.wait_ready()
    results, rss = [], []
    with server.client() as client:
        for k in range(10):
            job_id = client.submit(quick_request(tiny_checkpoint, seed=100 + k))
            results.append(client.wait(job_id, JOB_TIMEOUT_S, poll=0.05))
            rss.append(worker_rss(pid))
    assert server.wait_ready() == pid
    # The base stays loaded: the first job loads it, the nine others only swap the adapter.
    assert metric(server, "entropy_probe_base_model_loads_total") == 1
    assert metric(server, "entropy_probe_base_model_reuses_total") == 9
    print(f"\n[measured] timing.load job1={results[0].timing.load:.3f}s "
          f"job2={results[1].timing.load:.3f}s; worker RSS after job1={rss[0] / 2**20:.1f} MiB "
          f"after job10={rss[9] / 2**20:.1f} MiB ({rss[9] / rss[0] - 1:+.2%})")
    assert rss[9] <= 1.05 * rss[0], [r / 2**20 for r in rss]


def test_queue_full_and_cancel_queued_and_running(start_server, tiny_checkpoint):
    server = start_server(max_queue="1")                      # no token configured here
    running_id = server.http.post("/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    wait_running(server, running_id)
    unfinished = server.http.get(f"/probes/{running_id}")
    assert unfinished.headers["retry-after"]
    assert server.http.delete(f"/probes/{running_id}").status_code == 409
    queued = server.http.post("/probes", json=quick_request(tiny_checkpoint))
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    full = server.http.post("/probes", json=quick_request(tiny_checkpoint, seed=5))
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0

    c = server.http.post(f"/probes/{queued.json()['id']}/cancel")
    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert c.json()["error"]["code"] == "cancelled"

    with server.client() as client:
        assert client.cancel(running_id).status == JobStatus.cancelling
    job = poll(server, running_id, lambda j: j.status.finished)
    assert job.status == JobStatus.cancelled and job.error.code == ErrorCode.cancelled
    assert job.error.phase in ("rollouts", "teacher_forcing", "gradients", "step", "realized")
    assert job.result is None
    assert server.http.post(f"/probes/{running_id}/cancel").status_code == 409
    assert server.http.delete(f"/probes/{running_id}").status_code == 204
    with server.client() as client:          # the cancel flag does not leak into the next job
        assert client.wait(client.submit(quick_request(tiny_checkpoint)), JOB_TIMEOUT_S,
                           poll=0.1).delta_h1.units == 4


def test_restart_serves_finished_and_reports_interrupted(start_server, tiny_checkpoint,
                                                         tmp_path):
    state = tmp_path / "restart-state"
    first = start_server(state_dir=state)
    worker_pid = first.wait_ready()
    with first.client() as client:
        done_id = client.submit(quick_request(tiny_checkpoint), idempotency_key="k1")
        done = client.wait(done_id, JOB_TIMEOUT_S, poll=0.1)
    slow_id = first.http.post("/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    queued_id = first.http.post("/probes", json=quick_request(tiny_checkpoint, seed=9)).json()[
        "id"]
    wait_running(first, slow_id)
    first.kill()                                              # the server dies, no shutdown
    psutil.Process(worker_pid).wait(60)                       # its orphaned worker stops too

    second = start_server(state_dir=state)
    again = second.http.get(f"/probes/{done_id}").json()
    assert again["status"] == "succeeded"
    assert ProbeResult.model_validate(again["result"]) == done
    for job_id in (slow_id, queued_id):
        job = second.http.get(f"/probes/{job_id}").json()
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "interrupted" and "resubmit" in job["error"]["message"]
    with second.client() as client:                           # idempotency keys survive too
        assert client.submit(quick_request(tiny_checkpoint), idempotency_key="k1") == done_id
        with pytest.raises(ProbeHTTPError) as conflict:
            client.submit(quick_request(tiny_checkpoint, seed=4), idempotency_key="k1")
        assert conflict.value.status_code == 409
    idle_worker = second.wait_ready()
    second.kill()
    psutil.Process(idle_worker).wait(30)                      # an idle orphan stops as well


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--dir",
                           str(tmp_path / "demo-checkpoint")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=280,
                          env=dict(os.environ, OMP_NUM_THREADS=ONE_THREAD))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("δH₁", "gradient", "momentum", "weight decay", "ΔH", "ESS fraction",
                   "PSIS k", "peak host RSS", "timing"):
        assert needle in proc.stdout, needle
