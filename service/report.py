"""`entropy-probe report`: the /ui plots as one self-contained HTML file, from result files
(`entropy-probe run --output`, or job JSON from `status`) and/or a running service's jobs."""

from __future__ import annotations

from pathlib import Path

from service.pictures import dashboard
from service.pictures.page import report_page
from service.pictures.views import JobView

SERVICE_JOBS = 200                # the newest jobs a report takes from a service


def service_jobs(url: str, token: str | None, limit: int = SERVICE_JOBS) -> list[JobView]:
    """The service's newest jobs (finished or not), newest first."""
    from service.client import ProbeClient
    jobs, after = [], None
    with ProbeClient(url, token=token) as client:
        while len(jobs) < limit:
            page, more = client.list(limit=min(100, limit - len(jobs)), after=after)
            jobs += page
            if not more or not page:
                break
            after = page[-1].id
    return [JobView.from_job(j) for j in jobs]


def write_report(files: list[str], output: str, url: str | None = None,
                 token: str | None = None, title: str | None = None) -> int:
    """Writes the report; returns how many jobs it shows."""
    views = [JobView.from_file(f) for f in files]
    if url is not None:
        views += service_jobs(url, token)
    if not views:
        raise ValueError("nothing to report: name result files, or --url of a service")
    ids = [v.id for v in views]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"two inputs have the id {dup!r} (a result file's id is its name)")
    board = dashboard.build(views, detail="*", title=title or "entropy-probe report")
    Path(output).write_text(report_page(board), encoding="utf-8")
    return len(views)
