"""JobViews → Dashboard (the table and the figures): the one builder behind /ui and `report`."""

from __future__ import annotations

from schemas.dashboard import Dashboard, JobPlots, JobRow, RunPlot
from service.pictures import figures
from service.pictures.views import JobView

UNFINISHED = {"queued", "running", "cancelling"}


def row(job: JobView) -> JobRow:
    r = job.result
    out = JobRow(id=job.id, status=job.status, progress=job.progress, run=job.run,
                 checkpoint=job.adapter, duration_s=job.duration_s, error=job.error)
    if r is None:
        return out
    out.step, out.entropy = r.checkpoint_step, figures.entropy_kind(r)
    out.delta_h1, out.delta_h1_se = r.delta_h1.total, r.delta_h1.se
    if r.realized is not None:
        out.delta_h, out.delta_h_se = r.realized.delta_h, r.realized.se
    delta_j1 = getattr(r, "delta_j1", None)        # the reward side's estimate, when present
    if delta_j1 is not None:
        out.delta_j1, out.delta_j1_se = delta_j1.total, delta_j1.se
    return out


def job_plots(job: JobView) -> JobPlots:
    return JobPlots(lr_curve=figures.lr_curve_figure(job), memory=figures.memory_figure(job))


def build(jobs: list[JobView], detail: str | None = None, title: str = "entropy-probe"
          ) -> Dashboard:
    """The dashboard of `jobs` (newest first). `detail`: the id whose per-job plots to include
    (default: the newest job with a result), or "*" for every job with a result or a failure's
    memory trace."""
    done = [j for j in jobs if j.result is not None]
    drawable = [j for j in jobs if j.result is not None or j.memory_trace]
    # one plot per run and entropy kind: kinds differ in unit (per token, per response)
    runs: dict[tuple[str, str], list[JobView]] = {}
    for job in done:
        runs.setdefault((job.run, figures.entropy_kind(job.result)), []).append(job)
    listed = {j.id for j in jobs}
    if detail == "*":
        picked = drawable
    elif detail in listed:              # a job without plots yet (queued, running) stays chosen
        picked = [j for j in drawable if j.id == detail]
    else:
        picked = done[:1]
    return Dashboard(
        jobs=[row(j) for j in jobs],
        runs=[RunPlot(run=name, entropy=kind, figure=figures.run_figure(name, members))
              for (name, kind), members in sorted(runs.items())],
        details={j.id: job_plots(j) for j in picked},
        selected=detail if detail in listed else picked[0].id if len(picked) == 1 else None,
        unfinished=sum(j.status in UNFINISHED for j in jobs),
        template=figures.template(), title=title)
