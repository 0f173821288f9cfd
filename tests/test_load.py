"""Load: submitters (some repeating idempotency keys), pollers and a canceller against one real
server with a small queue for LOAD_SECONDS. No 5xx, no transport error, every accepted job is
listed and finishes as it should, the queue limit is really hit."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from helpers import FIGURES, Server, prompts_request, wait_job
from schemas import JobStatus

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("report_figures")]
LOAD_SECONDS = 20.0
SUBMITTERS, POLLERS = 3, 4            # and one canceller


@dataclass
class LoadRun:
    """What the client threads share: the jobs they got accepted, the status counts, the
    problems seen. Every field is read and written under `lock`."""

    server: Server
    checkpoint: tuple[str, str]
    stop: float                                    # time.monotonic() at which threads end
    accepted: list[str] = field(default_factory=list)
    keyed: dict[str, set[str]] = field(default_factory=dict)   # idempotency key → job ids
    cancels: dict[str, str] = field(default_factory=dict)      # job id → the cancel's answer
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def running(self) -> bool:
        return time.monotonic() < self.stop

    def note(self, r: httpx.Response | None, what: str) -> None:
        with self.lock:
            self.counts["requests"] += 1
            if r is None:
                self.problems.append(f"{what}: transport error")
                return
            self.counts[r.status_code] += 1
            if r.status_code >= 500:
                self.problems.append(f"{what}: {r.status_code} {r.text[:200]}")

    def call(self, client: httpx.Client, method: str, path: str,
             **kw) -> httpx.Response | None:
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.problems.append(f"{method} {path}: {type(exc).__name__}")
            return None
        self.note(r, f"{method} {path}")
        return r

    def keyed_ids(self) -> set[str]:
        return set().union(*self.keyed.values()) if self.keyed else set()


def submitter(run: LoadRun, k: int) -> None:
    """Submits small jobs; every 4th repeats one of three idempotency keys (same body)."""
    with httpx.Client(base_url=run.server.url, timeout=30) as client:
        n = 0
        while run.running():
            n += 1
            key = f"load-key-{n % 3}" if n % 4 == 0 else None
            body = prompts_request(run.checkpoint, seed=777 if key else 1000 * k + n)
            r = run.call(client, "POST", "/probes", json=body,
                         headers={"Idempotency-Key": key} if key else {})
            if r is None:
                continue
            if r.status_code == 202:
                with run.lock:
                    run.accepted.append(r.json()["id"])
                    if key:
                        run.keyed.setdefault(key, set()).add(r.json()["id"])
            elif r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
                time.sleep(0.2)
            else:
                run.problems.append(f"submit: {r.status_code} {r.text[:200]}")


def poller(run: LoadRun, k: int) -> None:
    """Reads health, readiness, metrics, lists and accepted jobs in turn."""
    with httpx.Client(base_url=run.server.url, timeout=30) as client:
        n = 0
        while run.running():
            n += 1
            with run.lock:
                some = run.accepted[(n * 7 + k) % len(run.accepted)] if run.accepted else "none"
            path = ["/healthz", "/readyz", "/metrics", "/probes?limit=100",
                    f"/probes/{some}", "/probes?status=succeeded&limit=5"][n % 6]
            r = run.call(client, "GET", path)
            if r is not None and r.status_code not in (200, 404 if some == "none" else 200):
                run.problems.append(f"GET {path}: {r.status_code}")
            time.sleep(0.01)


def canceller(run: LoadRun) -> None:
    """Cancels a recent job every second: it may be queued, running or finished."""
    with httpx.Client(base_url=run.server.url, timeout=30) as client:
        n = 0
        while run.running():
            time.sleep(1.0)
            n += 1
            with run.lock:      # the newest jobs, or a few back: queued, running or finished
                target = next((j for j in run.accepted[::-1][n % 4:] if j not in run.cancels
                               and j not in run.keyed_ids()), None)
            if target is None:
                continue
            r = run.call(client, "POST", f"/probes/{target}/cancel")
            if r is not None and r.status_code == 200:
                run.cancels[target] = r.json()["status"]
            elif r is not None and r.status_code != 409:      # 409: it already finished
                run.problems.append(f"cancel: {r.status_code} {r.text[:200]}")


def listed_ids(server: Server) -> set[str]:
    """Every job id GET /probes lists, page by page."""
    listed: set[str] = set()
    after = None
    while True:
        page = server.http.get("/probes", params={"limit": 100, **(
            {"after": after} if after else {})}).json()
        listed |= {j["id"] for j in page["data"]}
        if not page["has_more"]:
            return listed
        after = page["data"][-1]["id"]


def test_load_no_5xx_and_every_accepted_job_finishes(start_server, tiny_checkpoint):
    server = start_server(max_queue="3")
    run = LoadRun(server, tiny_checkpoint, time.monotonic() + LOAD_SECONDS)
    threads = [threading.Thread(target=submitter, args=(run, k)) for k in range(SUBMITTERS)]
    threads += [threading.Thread(target=poller, args=(run, k)) for k in range(POLLERS)]
    threads.append(threading.Thread(target=canceller, args=(run,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_SECONDS + 60)
    assert not any(t.is_alive() for t in threads)

    unique = set(run.accepted)          # a repeated idempotency key returns the same job
    assert all(len(ids) == 1 for ids in run.keyed.values()), run.keyed
    finished = [wait_job(server, job_id) for job_id in sorted(unique)]
    lost = unique - listed_ids(server)
    # A job ends succeeded unless we cancelled it: cancelled at once if it was queued, and
    # cancelled or (when the worker finished first) succeeded if it was running.
    allowed = {"cancelled": {JobStatus.cancelled},
               "cancelling": {JobStatus.cancelled, JobStatus.succeeded}}
    not_ok = [(j.id, j.status.value, j.error) for j in finished
              if j.status not in allowed.get(run.cancels.get(j.id), {JobStatus.succeeded})]
    counts = run.counts
    FIGURES["requests"] += counts["requests"]
    FIGURES["load_requests"] += counts["requests"]
    FIGURES["load_429"] += counts[429]
    FIGURES["load_jobs"] += len(unique)
    FIGURES["jobs_accepted"] += len(unique)
    FIGURES["jobs_lost"] += len(lost) + len(not_ok)
    FIGURES["failures"] += len(run.problems)
    print(f"\n[load] {LOAD_SECONDS:.0f} s, {SUBMITTERS} submitters + {POLLERS} pollers: "
          f"{counts['requests']} requests, statuses "
          f"{ {k: v for k, v in counts.items() if k != 'requests'} }, {len(unique)} jobs "
          f"accepted, {sum(j.status == JobStatus.succeeded for j in finished)} succeeded, "
          f"{sum(j.status == JobStatus.cancelled for j in finished)} cancelled "
          f"({len(run.cancels)} cancel requests accepted), {len(lost)} lost")
    assert not run.problems, run.problems[:10]
    assert unique and not lost and not not_ok, (lost, not_ok[:3])
    assert counts[429] > 0                   # the queue limit was really exercised
