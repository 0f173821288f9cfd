"""Dashboard: what GET /ui/data returns and `entropy-probe report` embeds — the job table and the
plots as plotly figure JSON ({data, layout}) that the page draws with plotly.js."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Figure = dict[str, Any]      # plotly.js figure JSON: {"data": [...traces], "layout": {...}}


class JobRow(BaseModel):
    id: str
    status: str
    progress: str | None = Field(None, description="A running job's phase and chunk count.")
    run: str = Field(description="The folder holding the checkpoint (a Trainer's output_dir).")
    checkpoint: str | None = Field(None, description="The adapter (or base model) probed.")
    step: int | None = Field(None, description="result.checkpoint_step")
    entropy: str | None = Field(None, description="The entropy kind: normalization, estimator.")
    delta_h1: float | None = None
    delta_h1_se: float | None = None
    delta_h: float | None = None
    delta_h_se: float | None = None
    delta_j1: float | None = None
    delta_j1_se: float | None = None
    duration_s: float | None = None
    error: str | None = None


class RunPlot(BaseModel):
    run: str
    entropy: str = Field(description="The entropy kind of its jobs (normalization, estimator).")
    figure: Figure


class JobPlots(BaseModel):
    lr_curve: Figure | None = Field(None, description="s·δH₁ vs ΔH(s) over lr multipliers.")
    memory: Figure | None = Field(None, description="Memory trace over time, by phase.")


class Dashboard(BaseModel):
    jobs: list[JobRow] = Field(description="Newest first.")
    runs: list[RunPlot] = Field(description="δH₁ and ΔH against checkpoint step, per run.")
    details: dict[str, JobPlots] = Field(
        description="Per-job plots, by job id: the selected job's (/ui) or every job's (report).")
    selected: str | None = Field(None, description="The job whose plots /ui shows.")
    unfinished: int = Field(0, description="Jobs still queued or running (the page polls).")
    template: Figure = Field(description="The plotly template every figure is drawn with.")
    title: str = "entropy-probe"
