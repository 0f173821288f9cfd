"""The three plots of /ui and `entropy-probe report`, as plotly figures (JSON for plotly.js).

- run_figure: δH₁ and the realized ΔH (± 1 SE) against the checkpoint step, one run;
- lr_curve_figure: s·δH₁ against the realized ΔH(s) over the lr multipliers s, one job: first
  order holds where the realized points lie in the predicted band;
- memory_figure: host RSS (and device peak on CUDA) at the end of each phase, coloured by phase.
Figures carry no template: the page applies one (TEMPLATE) to all of them.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import plotly.io as pio

from schemas import ProbeResult
from service.pictures.views import JobView

MIB = 2**20
PREDICTED, REALIZED = "#1f77b4", "#d62728"
PHASE_COLOURS = {"load": "#7f7f7f", "rollouts": "#9467bd", "teacher_forcing": "#1f77b4",
                 "gradients": "#d62728", "step": "#2ca02c", "realized": "#ff7f0e"}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78"]
MAX_STEP_TICKS = 12               # fewer steps than this: one tick per checkpoint
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"


def template() -> dict:
    """The one template every figure is drawn with (sent once per page, not per figure)."""
    layout = pio.templates["plotly_white"].layout.to_plotly_json()
    layout["font"] = {"family": FONT, "size": 13}
    return {"layout": layout}


def _layout(title: str, x: str, y: str, **extra) -> dict:
    return dict(title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
                xaxis={"title": {"text": x}, "zeroline": False},
                yaxis={"title": {"text": y}, "zeroline": True, "zerolinecolor": "#999",
                       "exponentformat": "e"},
                legend={"orientation": "h", "y": -0.22, "x": 0}, hovermode="closest",
                margin={"l": 70, "r": 20, "t": 50, "b": 40}, template="none", **extra)


def _json(fig: go.Figure) -> dict:
    return fig.to_plotly_json()


def entropy_kind(result: ProbeResult) -> str:
    """The entropy the numbers are in: "token_mean, full_vocabulary" (nats per token) ...;
    a result without the field is the first round's sequence entropy of sampled tokens."""
    kind = getattr(result, "entropy", None)
    if kind is None:
        return "sequence, sampled"
    return f"{kind.normalization}, {kind.estimator}"


def entropy_unit(result: ProbeResult) -> str:
    """What one unit of H is: nats per token (token_mean) or per response (sequence)."""
    per_token = entropy_kind(result).startswith("token_mean")
    return "nats per token" if per_token else "nats per response"


def _plain(text: str) -> str:
    """Text for a plotly label: plotly reads <b>, <a href> and entities in labels, and ids and
    paths come from users."""
    return html.escape(text, quote=False)


def short_path(path: str, keep: int = 2) -> str:
    """The last `keep` components of a path ("…/output/run-3"): titles stay one line."""
    parts = [p for p in path.split("/") if p]
    return path if len(parts) <= keep else "…/" + "/".join(parts[-keep:])


def run_figure(run: str, jobs: list[JobView]) -> dict:
    """δH₁ and the realized ΔH, ± 1 SE, against the checkpoint step for the succeeded jobs of one
    run and one entropy kind (a job without a step is placed by its order when any job of the
    run lacks one)."""
    done = [j for j in jobs if j.result is not None]
    by_step = all(j.result.checkpoint_step is not None for j in done)
    if by_step:
        done.sort(key=lambda j: j.result.checkpoint_step)
        xs = [j.result.checkpoint_step for j in done]
        x_title = "checkpoint step (trainer global_step)"
    else:
        done.sort(key=lambda j: (j.created_at is None, j.created_at or 0, j.id))
        xs = list(range(1, len(done) + 1))
        x_title = "job, oldest first (no checkpoint-N folder, so no step)"
    ids = [j.id for j in done]               # customdata: a click selects the job
    labels = [_plain(i) for i in ids]
    # lines join one job per step; several jobs at one step (seeds, batches) stand as points
    mode = "lines+markers" if len(set(xs)) == len(xs) else "markers"
    kind = f" · {entropy_kind(done[0].result)}" if done else ""
    title = f"δH₁ vs realized ΔH · run {_plain(short_path(run))}{kind}"
    y_title = f"ΔH per step ({entropy_unit(done[0].result)})" if done else "ΔH per step"
    fig = go.Figure(layout=_layout(title, x_title, y_title, scattermode="group",
                                   scattergap=0.8))
    fig.add_scatter(
        x=xs, y=[j.result.delta_h1.total for j in done], customdata=ids, text=labels,
        error_y=_errors([j.result.delta_h1.se for j in done]), name="δH₁ predicted ± 1 SE",
        mode=mode, marker={"color": PREDICTED, "size": 9},
        line={"color": PREDICTED, "dash": "dot"},
        hovertemplate="%{text}<br>step %{x}<br>δH₁ %{y:.3e}<extra></extra>")
    realized = [j for j in done if j.result.realized is not None]
    fig.add_scatter(
        x=[x for x, j in zip(xs, done) if j.result.realized is not None],
        y=[j.result.realized.delta_h for j in realized], customdata=[j.id for j in realized],
        text=[_plain(j.id) for j in realized],
        error_y=_errors([j.result.realized.se for j in realized]),
        name="ΔH realized (SNIS) ± 1 SE", mode=mode,
        marker={"color": REALIZED, "size": 9, "symbol": "diamond"},
        line={"color": REALIZED, "dash": "dot"},
        hovertemplate="%{text}<br>step %{x}<br>ΔH %{y:.3e}<extra></extra>")
    if not by_step:
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=labels)
    elif len(set(xs)) <= MAX_STEP_TICKS:
        fig.update_xaxes(tickmode="array", tickvals=sorted(set(xs)))
    return _json(fig)


def _errors(se: list[float | None]) -> dict:
    return {"type": "data", "array": [s if s is not None else 0.0 for s in se],
            "visible": True, "thickness": 1.5, "width": 5}


def lr_curve_figure(job: JobView) -> dict | None:
    """Predicted s·δH₁ (band: ± s·SE) and realized ΔH(s) ± SE over the lr multipliers s."""
    r = job.result
    if r is None or r.realized is None:
        return None
    rows = sorted(r.realized.by_lr_multiplier, key=lambda row: row.lr_multiplier)
    d, se = r.delta_h1.total, r.delta_h1.se or 0.0
    s_line = sorted({0.0, *(row.lr_multiplier for row in rows)})
    fig = go.Figure(layout=_layout(
        f"First order along the step · {entropy_kind(r)}",
        f"lr multiplier s (s = 1: the real step, lr {r.optimizer.lr:.2e})",
        f"ΔH ({entropy_unit(r)})"))
    fig.add_scatter(x=s_line, y=[s * (d + se) for s in s_line], mode="lines", hoverinfo="skip",
                    line={"width": 0}, showlegend=False)
    fig.add_scatter(x=s_line, y=[s * (d - se) for s in s_line], mode="lines", hoverinfo="skip",
                    line={"width": 0}, fill="tonexty", fillcolor="rgba(31,119,180,0.18)",
                    name="s·δH₁ ± s·SE (first order)")
    fig.add_scatter(x=s_line, y=[s * d for s in s_line], mode="lines", name="s·δH₁",
                    line={"color": PREDICTED},
                    hovertemplate="s %{x}<br>s·δH₁ %{y:.3e}<extra></extra>")
    fig.add_scatter(
        x=[row.lr_multiplier for row in rows], y=[row.delta_h for row in rows],
        error_y=_errors([row.se for row in rows]), mode="lines+markers",
        name="ΔH(s) realized ± 1 SE", marker={"color": REALIZED, "size": 9, "symbol": "diamond"},
        line={"color": REALIZED},
        customdata=[[f"{row.ess_fraction:.3f}", "n/a" if row.psis_k is None
                     else f"{row.psis_k:.2f}"] for row in rows],
        hovertemplate="s %{x}<br>ΔH %{y:.3e}<br>ESS fraction %{customdata[0]}"
                      "<br>PSIS k̂ %{customdata[1]}<extra></extra>")
    return _json(fig)


def phase_colour(phase: str, seen: dict[str, str]) -> str:
    if phase in PHASE_COLOURS:
        return PHASE_COLOURS[phase]
    return seen.setdefault(phase, SPARE_COLOURS[len(seen) % len(SPARE_COLOURS)])


def memory_figure(job: JobView) -> dict | None:
    """Host RSS (solid) and, on CUDA, the device peak within each phase (dashed), over the
    probe's time; each phase is drawn in its colour over the time it took. A failed job's
    trace (out of memory, deadline) ends at the phase it failed in."""
    trace = job.memory_trace
    if not trace:
        return None
    y_title = "host RSS, MiB" + (" (dashed: device peak)" if any(
        p.device_peak_bytes is not None for p in trace) else "")
    title = "Memory by phase" + (" up to the failure" if job.result is None else "")
    fig = go.Figure(layout=_layout(title,
                                   "time since the probe started (s)", y_title,
                                   legend_title_text="phase"))
    spare: dict[str, str] = {}
    shown: set[str] = set()
    start_t, start_rss = 0.0, None
    for point in trace:
        colour = phase_colour(point.phase, spare)
        rss = point.host_rss_bytes / MIB
        legend = point.phase not in shown
        shown.add(point.phase)
        fig.add_scatter(
            x=[start_t, point.t], y=[rss if start_rss is None else start_rss, rss],
            mode="lines+markers", name=point.phase, legendgroup=point.phase,
            showlegend=legend, line={"color": colour, "width": 3},
            marker={"color": colour, "size": [0, 8]},
            hovertemplate=f"{point.phase}<br>%{{x:.2f}} s<br>host RSS %{{y:.0f}} MiB"
                          "<extra></extra>")
        if point.device_peak_bytes is not None:
            peak = point.device_peak_bytes / MIB
            fig.add_scatter(
                x=[start_t, point.t], y=[peak, peak], mode="lines", legendgroup=point.phase,
                showlegend=False, line={"color": colour, "width": 2, "dash": "dash"},
                hovertemplate=f"{point.phase}<br>device peak %{{y:.0f}} MiB<extra></extra>")
        start_t, start_rss = point.t, rss
    fig.add_annotation(text=_peaks(job, trace), xref="paper", yref="paper", x=0, y=1.0,
                       yanchor="bottom", showarrow=False, font={"size": 12, "color": "#555"})
    return _json(fig)


def _peaks(job: JobView, trace: list) -> str:
    """The peaks the result reports (they include samples between marks), else the trace's."""
    if job.result is not None:
        host, device = job.result.memory.peak_host_rss_bytes, job.result.memory.peak_device_bytes
    else:
        host = max(p.host_rss_bytes for p in trace)
        device = max((p.device_peak_bytes for p in trace if p.device_peak_bytes is not None),
                     default=None)
    note = f"peak host RSS {host / MIB:.0f} MiB"
    return note + (f" · peak device {device / MIB:.0f} MiB" if device is not None else "")
