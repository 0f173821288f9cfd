"""A small HTTP client for the probe service (what a training loop uses).

    client = ProbeClient("http://127.0.0.1:8000", token=os.environ.get("ENTROPY_PROBE_API_TOKEN"))
    job_id = client.submit(request)
    result = client.wait(job_id, timeout=600)
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import quote

import httpx

from schemas import JobError, JobList, JobStatus, ProbeJob, ProbeRequest, ProbeResult, Progress


class ProbeHTTPError(Exception):
    """The service refused a call (status code and its `detail`)."""

    def __init__(self, status_code: int, detail: Any, retry_after: float | None = None):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code, self.detail, self.retry_after = status_code, detail, retry_after


class ProbeFailed(Exception):
    """The job ended failed or cancelled; `error` is its JobError (code, message, phase)."""

    def __init__(self, job_id: str, status: JobStatus, error: JobError | None):
        code = error.code.value if error else "unknown"
        message = error.message if error else "no error recorded"
        phase = f" in {error.phase}" if error and error.phase else ""
        super().__init__(f"probe job {job_id} {status.value}{phase}: [{code}] {message}")
        self.job_id, self.status, self.error = job_id, status, error


def _job_path(job_id: str) -> str:
    """/probes/<id>, the id escaped so that no id can name another route."""
    return f"/probes/{quote(job_id, safe='')}"


class ProbeClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout)

    def __enter__(self) -> ProbeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        r = self._http.request(method, url, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            retry = r.headers.get("Retry-After")
            raise ProbeHTTPError(r.status_code, detail,
                                 float(retry) if retry and retry.isdigit() else None)
        return r

    def submit(self, request: ProbeRequest | dict, idempotency_key: str | None = None) -> str:
        """Queue a job; returns its id. Raises ProbeHTTPError (422 bad request, 429 queue full,
        409 idempotency conflict, 401)."""
        body = request.model_dump(mode="json") if isinstance(request, ProbeRequest) else request
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/probes", json=body, headers=headers).json()["id"]

    def get(self, job_id: str) -> ProbeJob:
        return ProbeJob.model_validate_json(self._call("GET", _job_path(job_id)).content)

    def list(self, status: JobStatus | None = None, limit: int = 20,
             after: str | None = None) -> tuple[list[ProbeJob], bool]:
        """One page of jobs, newest first, and whether more follow (pass the last id as
        `after`)."""
        params = {k: v for k, v in (("status", status.value if status else None),
                                    ("limit", limit), ("after", after)) if v is not None}
        page = JobList.model_validate_json(self._call("GET", "/probes", params=params).content)
        return page.data, page.has_more

    def cancel(self, job_id: str) -> ProbeJob:
        return ProbeJob.model_validate_json(
            self._call("POST", f"{_job_path(job_id)}/cancel").content)

    def wait(self, job_id: str, timeout: float, poll: float = 0.5,
             on_progress: Callable[[Progress], None] | None = None) -> ProbeResult:
        """Poll until the job finishes. Returns its result; raises ProbeFailed when it failed or
        was cancelled, TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Progress | None = None
        while True:
            job = self.get(job_id)
            if on_progress is not None and job.progress != last:
                on_progress(job.progress)
                last = job.progress
            if job.status == JobStatus.succeeded:
                return job.result
            if job.status.finished:
                raise ProbeFailed(job_id, job.status, job.error)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"probe job {job_id} still {job.status.value} after "
                                   f"{timeout:g} s")
            time.sleep(min(poll, left))
