"""The SQLite job store: a server holding 5,000 finished jobs with results is as small as an empty
one and pages through them in order; a SIGKILL during writes loses no finished job; a first-round
state directory (one JSON file per job) is imported once. Real `entropy-probe serve` processes,
real results from the tiny checkpoint."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from helpers import poll, quick_request
from schemas import ErrorCode, JobStatus, ProbeJob, ProbeRequest, ProbeResult
from service.store import DB_NAME, JobStore, request_hash

pytestmark = pytest.mark.timeout(300)
BULK_SUCCEEDED = 5_000
BULK_FAILED_EVERY = 10          # and one failed job after every 10 succeeded ones
RSS_TOLERANCE = 1.10
PAGE = 100
SETTLE_S = 1.0


@pytest.fixture(scope="module")
def finished(module_server, tiny_checkpoint) -> tuple[dict, ProbeJob]:
    """A real request body and the succeeded job it made (its result fills stores in bulk)."""
    body = quick_request(tiny_checkpoint, seed=41)
    job_id = module_server.http.post("/probes", json=body).json()["id"]
    job = poll(module_server, job_id, lambda j: j.status.finished)
    assert job.status == JobStatus.succeeded, job.error
    return body, job


def fill(state_dir: Path, body: dict, result: ProbeResult, succeeded: int) -> list[str]:
    """Through the store's own API, as the server would (without an fsync per commit):
    `succeeded` jobs that succeed with `result`, one failed job after every BULK_FAILED_EVERY.
    Returns the succeeded ids in creation order."""
    store = JobStore(state_dir, durable=False)
    store.load()
    req = ProbeRequest.model_validate(body)
    ids = []
    for i in range(succeeded + succeeded // BULK_FAILED_EVERY):
        job, _ = store.create(req, None, max_queue=1)
        assert store.take_next()[0] == job.id
        if i % (BULK_FAILED_EVERY + 1) == BULK_FAILED_EVERY:
            store.fail(job.id, ErrorCode.degenerate_batch, "every reward equal", "rollouts")
        else:
            assert store.succeed(job.id, result)
            ids.append(job.id)
    store.close()
    return ids


def server_rss(server) -> int:
    time.sleep(SETTLE_S)
    return psutil.Process(server.proc.pid).memory_info().rss


def page_through(server, status: str) -> list[list[str]]:
    """Every page of GET /probes?status=...&limit=100, following `after`."""
    pages, after = [], None
    while True:
        params = {"status": status, "limit": PAGE, **({"after": after} if after else {})}
        r = server.http.get("/probes", params=params)
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        assert all(j["status"] == status and j["result"] for j in body["data"])
        pages.append([j["id"] for j in body["data"]])
        if not body["has_more"]:
            return pages
        after = pages[-1][-1]


def test_5000_finished_jobs_keep_the_server_small_and_page_in_order(start_server, finished,
                                                                      tmp_path):
    """At rest, the full server is as small as an empty one. Paging costs what one page of 100
    results costs, whatever the store holds: reading all 50 pages of the full server ends
    where reading the one page of a server holding 100 jobs does."""
    body, job = finished
    empty = start_server(state_dir=tmp_path / "empty")
    rss_empty = server_rss(empty)
    empty.stop()
    fill(tmp_path / "one-page", body, job.result, PAGE)
    one_page = start_server(state_dir=tmp_path / "one-page")
    assert len(page_through(one_page, "succeeded")) == 1
    rss_one_page = server_rss(one_page)
    one_page.stop()

    t0 = time.monotonic()
    ids = fill(tmp_path / "full", body, job.result, BULK_SUCCEEDED)
    fill_s = time.monotonic() - t0
    db_bytes = (tmp_path / "full" / DB_NAME).stat().st_size
    full = start_server(state_dir=tmp_path / "full")
    rss_full = server_rss(full)
    pages = page_through(full, "succeeded")
    rss_full_paged = server_rss(full)
    one = full.http.get(f"/probes/{ids[0]}").json()

    print(f"\n[store] {len(ids)} succeeded + {len(ids) // BULK_FAILED_EVERY} failed jobs written "
          f"in {fill_s:.1f} s, database {db_bytes / 2**20:.1f} MiB; server RSS at rest: empty "
          f"{rss_empty / 2**20:.1f} MiB, full {rss_full / 2**20:.1f} MiB "
          f"({rss_full / rss_empty - 1:+.1%}); after paging: 1 page of {PAGE} jobs "
          f"{rss_one_page / 2**20:.1f} MiB, {len(pages)} pages of the full store "
          f"{rss_full_paged / 2**20:.1f} MiB ({rss_full_paged / rss_one_page - 1:+.1%})")
    assert [i for page in pages for i in page] == ids[::-1]       # newest first, each once
    assert all(len(page) == PAGE for page in pages)
    assert ProbeResult.model_validate(one["result"]) == job.result
    assert rss_full <= RSS_TOLERANCE * rss_empty
    assert rss_full_paged <= RSS_TOLERANCE * rss_one_page
    failed = full.http.get("/probes", params={"status": "failed", "limit": PAGE}).json()
    assert len(failed["data"]) == PAGE and failed["has_more"]


# -- a SIGKILL in the middle of writes --------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from schemas import ProbeRequest, ProbeResult
    from service.store import JobStore
    req = ProbeRequest.model_validate_json(Path(sys.argv[2]).read_text())
    result = ProbeResult.model_validate_json(Path(sys.argv[3]).read_text())
    store = JobStore(Path(sys.argv[1]))
    store.load()
    while True:
        job, _ = store.create(req, None, max_queue=10**6)
        store.take_next()
        store.progress(job.id, "gradients", 1, 2)
        store.succeed(job.id, result)
        print(job.id, flush=True)          # only after the commit
""")


def test_sigkill_of_a_writing_process_loses_no_finished_job(finished, tmp_path):
    """A process that writes as fast as it can (create, take, progress, succeed) is killed at
    a random moment: every job it had finished is there with its result, the file is sound."""
    body, job = finished
    (tmp_path / "req.json").write_text(ProbeRequest.model_validate(body).model_dump_json())
    (tmp_path / "result.json").write_text(job.result.model_dump_json())
    state = tmp_path / "killed-writer"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state), str(tmp_path / "req.json"),
                             str(tmp_path / "result.json")], stdout=subprocess.PIPE, text=True)
    done: list[str] = []
    reader = threading.Thread(target=lambda: done.extend(line.strip() for line in proc.stdout))
    reader.start()
    deadline = time.monotonic() + 60
    while len(done) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reader.join(10)
    assert len(done) >= 200, "the writer did not get going"

    store = JobStore(state)
    interrupted = store.load()
    assert interrupted <= 1                       # at most the job it was writing
    for job_id in done:
        got = store.get(job_id)
        assert got.status == JobStatus.succeeded and got.result == job.result, job_id
    total = sum(store.counts().values())
    assert total in (len(done), len(done) + 1)
    store.close()
    with sqlite3.connect(state / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    print(f"\n[store] writer killed after {len(done)} finished jobs; "
          f"{total - len(done)} in flight, {interrupted} marked interrupted")


def test_sigkill_of_the_server_during_writes_loses_no_finished_job(start_server, tiny_checkpoint,
                                                                    tmp_path):
    """Real jobs finish in the worker while a client submits and cancels queued jobs as fast as
    it can (two writes a round); the server is SIGKILLed in the middle. Every job a client saw
    finished is served unchanged after the restart; every accepted job is listed."""
    state = tmp_path / "killed-server"
    server = start_server(state_dir=state, max_queue="100000")
    real = [server.http.post("/probes", json=quick_request(tiny_checkpoint, seed=s)).json()["id"]
            for s in (51, 52, 53)]
    seen: dict[str, dict] = {}         # job id → the finished job as a client saw it
    accepted: list[str] = []
    stop = threading.Event()

    def churn() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = client.post("/probes", json=quick_request(tiny_checkpoint, seed=1000 + n))
                    accepted.append(r.json()["id"])
                    c = client.post(f"/probes/{accepted[-1]}/cancel")
                    if c.status_code == 200 and c.json()["status"] == "cancelled":
                        seen[accepted[-1]] = c.json()
                except httpx.HTTPError:
                    return

    churner = threading.Thread(target=churn)
    churner.start()
    for job_id in real[:2]:
        seen[job_id] = poll(server, job_id, lambda j: j.status.finished).model_dump(mode="json")
    time.sleep(0.5)
    server.kill()                                   # mid-churn, maybe mid-job
    stop.set()
    churner.join(30)
    assert len(accepted) > 20 and seen[real[0]]["status"] == "succeeded"

    again = start_server(state_dir=state)
    for job_id, before in seen.items():
        assert again.http.get(f"/probes/{job_id}").json() == before, job_id
    listed: set[str] = set()
    after = None
    while True:
        page = again.http.get("/probes", params={"limit": PAGE, **(
            {"after": after} if after else {})}).json()
        listed |= {j["id"] for j in page["data"]}
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert set(accepted) | set(real) <= listed
    unfinished = [j for j in listed if not JobStatus(
        again.http.get(f"/probes/{j}").json()["status"]).finished]
    assert not unfinished
    print(f"\n[store] server killed after {len(accepted)} churned jobs; {len(seen)} seen "
          f"finished, all served unchanged")


# -- the first round's state directory --------------------------------------------------------

def first_round_record(job: dict, body: dict, seq: int, key: str | None = None) -> str:
    """A job file as the first round's store wrote it (service/store.py up to fb9c2f1,
    Record.to_json): the validated request, its hash, the job as JSON."""
    req = ProbeRequest.model_validate(body)
    return json.dumps({"seq": seq, "request_hash": request_hash(req), "idempotency_key": key,
                       "request": json.loads(req.model_dump_json()), "job": job})


def test_first_round_state_directory_is_imported_once(start_server, finished, tiny_checkpoint,
                                                       tmp_path):
    body, job = finished
    state = tmp_path / "first-round"
    jobs = state / "jobs"
    jobs.mkdir(parents=True)
    done = dict(job.model_dump(mode="json"), id="old-done")
    good = first_round_record(done, body, seq=3, key="old-key")
    (jobs / "old-done.json").write_text(good)
    running = dict(done, id="old-running", status="running", result=None, finished_at=None)
    (jobs / "old-running.json").write_text(first_round_record(running, body, seq=13))
    queued = dict(running, id="old-queued", status="queued", started_at=None)
    (jobs / "old-queued.json").write_text(first_round_record(queued, body, seq=14))
    record = json.loads(good)
    damaged = {"truncated": good[: len(good) // 2], "array": "[]", "empty": "",
               "no-seq": json.dumps({"job": record["job"]}), "bad-job": json.dumps(
                   {**record, "job": {"id": 1}}), "binary": b"\xff\xfe\x00\x01"}
    for name, content in damaged.items():
        path = jobs / f"{name}.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    (jobs / "leftover.json.tmp").write_text("{")

    first = start_server(state_dir=state)
    again = first.http.get("/probes/old-done").json()
    assert again["status"] == "succeeded" and again["result"] == done["result"]
    for job_id in ("old-running", "old-queued"):    # neither finished nor silently dropped
        got = first.http.get(f"/probes/{job_id}").json()
        assert got["status"] == "failed" and got["error"]["code"] == "interrupted", got
    listed = [j["id"] for j in first.http.get("/probes").json()["data"]]
    assert listed == ["old-queued", "old-running", "old-done"]       # the old creation order
    for name in damaged:
        assert (jobs / f"{name}.corrupt").exists() and not (jobs / f"{name}.json").exists()
    assert not (jobs / "leftover.json.tmp").exists()
    log = first.read_log()
    assert log.count("skipping unreadable job file") == len(damaged), log[-3000:]
    assert "imported 3 jobs" in log
    with first.client() as client:                  # its idempotency keys hold as well
        assert client.submit(body, idempotency_key="old-key") == "old-done"
        new = client.submit(quick_request(tiny_checkpoint, seed=42))
        assert client.wait(new, 120, poll=0.1).delta_h1.units == 4
    first.stop()

    (jobs / "late.json").write_text(first_round_record(dict(done, id="late"), body, seq=99))
    second = start_server(state_dir=state)
    assert second.http.get("/probes/late").status_code == 404        # imported once only
    listed = [j["id"] for j in second.http.get("/probes").json()["data"]]
    assert listed == [new, "old-queued", "old-running", "old-done"]
    assert "imported" not in second.read_log()
