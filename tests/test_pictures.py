"""/ui, `entropy-probe report` and the offline /docs, in a real headless Chromium against a real
token-protected server with finished jobs on TRL-style `checkpoint-N` folders.

Set ENTROPY_PROBE_SCREENSHOTS=DIR to keep PNGs of what the browser drew."""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import pytest

from headless import browser, is_local, open_tab, resource_urls, wait_until  # noqa: F401
from probe_core.tiny import TinyConfig, write_tiny_checkpoint
from probe_core.trainer_state import trainer_step
from service.cli import main as cli
from service.client import ProbeFailed
from service.demo import demo_request

TOKEN = "pictures-token"
SERVER_ENV = {"api_token": TOKEN}
JOB_TIMEOUT_S = 120.0
STEPS = (1, 2)                 # the run's checkpoint-N folders
UI_TIMEOUT_MS = 30_000


def _request(base: str, adapter: str, seed: int = 0) -> dict:
    body = demo_request(base, adapter)
    body["realized"]["lr_multipliers"] = [0.5, 1.0, 2.0]
    body["seed"] = seed
    return body


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory) -> str:
    """<root>/pictures-run/checkpoint-{1,2}: the same tiny training after 1 and 2 real steps
    (the base is the fixture's: same seed), each with the Trainer's trainer_state.json."""
    root = os.path.dirname(tiny_checkpoint[0])
    run = os.path.join(root, "pictures-run")
    for k in STEPS:
        scratch = str(tmp_path_factory.mktemp(f"train{k}"))
        _, adapter = write_tiny_checkpoint(scratch, TinyConfig(train_steps=k))
        shutil.move(adapter, os.path.join(run, f"checkpoint-{k}"))
        with open(os.path.join(run, f"checkpoint-{k}", "trainer_state.json"), "w") as f:
            json.dump({"global_step": k, "log_history": []}, f)
    return run


@pytest.fixture(scope="module")
def jobs(module_server, tiny_checkpoint, run_dir) -> dict[str, tuple[str, int | None]]:
    """Three finished jobs: job id → (adapter, expected checkpoint_step)."""
    base, plain_adapter = tiny_checkpoint
    adapters = [(os.path.join(run_dir, f"checkpoint-{k}"), k) for k in STEPS]
    adapters.append((plain_adapter, None))
    with module_server.client() as client:
        ids = {client.submit(_request(base, a)): (a, step) for a, step in adapters}
        for job_id in ids:
            client.wait(job_id, timeout=JOB_TIMEOUT_S)
    return ids


@pytest.fixture(scope="module")
def failed_job(module_server, tiny_checkpoint, run_dir) -> str:
    """A job on <run>/checkpoint-3, a copy of checkpoint-2 without optimizer.pt: it fails."""
    broken = os.path.join(run_dir, "checkpoint-3")
    shutil.copytree(os.path.join(run_dir, "checkpoint-2"), broken,
                    ignore=shutil.ignore_patterns("optimizer.pt"))
    with module_server.client() as client:
        job_id = client.submit(_request(tiny_checkpoint[0], broken))
        with pytest.raises(ProbeFailed):
            client.wait(job_id, timeout=JOB_TIMEOUT_S)
    return job_id


def _screenshot(tab, name: str, full_page: bool = True) -> None:
    out = os.environ.get("ENTROPY_PROBE_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        tab.page.screenshot(path=os.path.join(out, name), full_page=full_page)


def _assert_nothing_left_the_machine(tab) -> None:
    assert tab.blocked == [], f"the page asked for outside URLs: {tab.blocked}"
    outside = [u for u in resource_urls(tab) if not is_local(u)]
    assert outside == [], f"resources from outside: {outside}"
    assert tab.errors == [], f"script errors: {tab.errors}"


def test_trainer_step_reads_trainer_state_then_the_folder_name(tmp_path):
    named = tmp_path / "checkpoint-40"
    named.mkdir()
    assert trainer_step(str(named)) == 40
    (named / "trainer_state.json").write_text(json.dumps({"global_step": 41}))
    assert trainer_step(str(named)) == 41                 # the Trainer's own record wins
    (named / "trainer_state.json").write_text("{not json")
    assert trainer_step(str(named) + "/") == 40           # unreadable: the name decides
    other = tmp_path / "adapter"
    other.mkdir()
    assert trainer_step(str(other)) is None
    (other / "trainer_state.json").write_text(json.dumps({"global_step": "7"}))
    assert trainer_step(str(other)) is None               # not an int: not a step
    assert trainer_step(str(tmp_path / "checkpoint-x")) is None
    assert trainer_step(None) is None


def test_results_carry_the_checkpoint_and_its_step(module_server, jobs, failed_job, run_dir):
    with module_server.client() as client:
        for job_id, (adapter, step) in jobs.items():
            job = client.get(job_id)
            assert job.result.checkpoint_step == step
            assert job.result.checkpoint.adapter == adapter == job.checkpoint.adapter
        # a job that fails still says which checkpoint it was on (the /ui table shows it)
        job = client.get(failed_job)
        assert job.error.code.value == "optimizer_state_missing"
        assert job.checkpoint.adapter == os.path.join(run_dir, "checkpoint-3")
        assert job.result is None


def test_ui_asks_for_the_token_then_draws_jobs_and_plots_and_follows_new_jobs(
        browser, module_server, jobs, failed_job, tiny_checkpoint, run_dir):
    url = module_server.url
    assert httpx.get(f"{url}/ui").status_code == 200           # a plain page load: no header
    assert httpx.get(f"{url}/ui/data").status_code == 401
    tab = open_tab(browser)
    page = tab.page
    page.goto(f"{url}/ui")
    page.wait_for_selector("#ep-token-input", state="visible", timeout=UI_TIMEOUT_MS)
    assert page.is_hidden("#ep-main")
    page.fill("#ep-token-input", "not-the-token")
    page.click("#ep-token button")
    wait_until(page, "document.getElementById('ep-token-error').textContent"
                     ".includes('refused')")
    page.fill("#ep-token-input", TOKEN)
    page.click("#ep-token button")
    for job_id in jobs:
        page.wait_for_selector(f"tr[data-job='{job_id}']", timeout=UI_TIMEOUT_MS)
    wait_until(page, "document.querySelectorAll('#ep-runs .plot svg.main-svg').length >= 2 && "
                     "document.querySelectorAll('#ep-details .plot svg.main-svg').length >= 2")
    assert page.evaluate("document.querySelectorAll('#ep-runs .plot').length") == 2  # 2 runs
    # the run's plot has δH₁ and ΔH at the two checkpoint steps
    steps = page.evaluate("Array.from(document.querySelectorAll('#ep-runs .plot'))"
                          ".map(d => d.data.map(t => t.x))")
    assert [[1, 2], [1, 2]] in steps
    table = page.inner_text("#ep-jobs")
    assert "checkpoint-2" in table and "succeeded" in table and "±" in table
    assert "checkpoint-3" in table and "[optimizer_state_missing]" in table  # the failed one
    _screenshot(tab, "ui.png")

    # a job submitted now shows up, finished, without a reload
    with module_server.client() as client:
        new_id = client.submit(_request(tiny_checkpoint[0], os.path.join(run_dir,
                                                                         "checkpoint-1"), 1))
    page.wait_for_selector(f"tr[data-job='{new_id}'] .badge.succeeded", timeout=UI_TIMEOUT_MS)
    page.click(f"tr[data-job='{new_id}']")                    # its own plots on a click
    page.wait_for_selector(f"#ep-details [data-job='{new_id}'] .plot svg.main-svg",
                           timeout=UI_TIMEOUT_MS)
    page.click(f"tr[data-job='{failed_job}']")                # no result, no trace: a note
    page.wait_for_selector("#ep-no-plots:not([hidden])", timeout=UI_TIMEOUT_MS)
    assert f"{failed_job} has no plots yet (failed)" in page.inner_text("#ep-no-plots")
    _assert_nothing_left_the_machine(tab)


def test_report_is_one_self_contained_file(browser, module_server, jobs, tmp_path,
                                           monkeypatch):
    files = []
    with module_server.client() as client:
        for i, job_id in enumerate(jobs):
            job = client.get(job_id)
            path = tmp_path / f"{job_id}.json"
            # a `run --output` result file, and one job file as `status` prints it
            path.write_text(job.result.model_dump_json() if i else job.model_dump_json())
            files.append(str(path))
    out = tmp_path / "report.html"
    assert cli(["report", *files, "--output", str(out)]) == 0
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", out.read_text(), flags=re.S)
    assert "<script" not in markup and "<link" in markup
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", markup), "outside links"

    tab = open_tab(browser)
    tab.page.goto(out.as_uri())
    for job_id in jobs:
        tab.page.wait_for_selector(f"tr[data-job='{job_id}']", timeout=UI_TIMEOUT_MS)
    wait_until(tab.page, "document.querySelectorAll('#ep-details .plot svg.main-svg').length >= "
                         f"{2 * len(jobs)} && "
                         "document.querySelectorAll('#ep-runs .plot svg.main-svg').length >= 2")
    assert tab.page.is_hidden("#ep-token")
    _screenshot(tab, "report.png")
    _assert_nothing_left_the_machine(tab)

    monkeypatch.setenv("ENTROPY_PROBE_API_TOKEN", TOKEN)
    live = tmp_path / "live.html"
    assert cli(["report", "--url", module_server.url, "--output", str(live)]) == 0
    config = re.search(r'<script type="application/json" id="ep-config">(.*?)</script>',
                       live.read_text(), re.S).group(1)
    shown = {row["id"] for row in json.loads(config)["dashboard"]["jobs"]}
    assert set(jobs) <= shown


def test_docs_and_redoc_render_without_a_cdn(browser, module_server):
    tab = open_tab(browser)
    tab.page.goto(f"{module_server.url}/docs")
    tab.page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=UI_TIMEOUT_MS)
    assert "/probes" in tab.page.inner_text(".swagger-ui")
    _screenshot(tab, "docs.png", full_page=False)
    _assert_nothing_left_the_machine(tab)

    tab = open_tab(browser)
    tab.page.goto(f"{module_server.url}/redoc")
    wait_until(tab.page, "document.body.innerText.includes('/probes/{job_id}')")
    _screenshot(tab, "redoc.png", full_page=False)
    _assert_nothing_left_the_machine(tab)


def test_figures_of_a_cuda_trace_and_missing_statistics_are_valid_json(module_server, jobs,
                                                                        tmp_path):
    """The device-memory path (no GPU here: a real result given a CUDA-shaped trace) and
    statistics that are null (PSIS off, SE undefined) still give strict JSON figures."""
    from schemas.result import TracePoint
    from service.pictures import dashboard, figures
    from service.pictures.views import JobView

    with module_server.client() as client:
        result = client.get(next(iter(jobs))).result
    mib = 2**20
    trace = [TracePoint(phase=p, t=t, device_allocated_bytes=a * mib,
                        device_peak_bytes=k * mib, device_reserved_bytes=2 * k * mib,
                        host_rss_bytes=900 * mib)
             for p, t, a, k in (("load", 1.0, 500, 510), ("gradients", 2.5, 520, 900),
                                ("realized", 3.0, 505, 700))]
    rows = [r.model_copy(update={"psis_k": None, "se": None})
            for r in result.realized.by_lr_multiplier]
    odd = result.model_copy(update={
        "memory": result.memory.model_copy(update={"trace": trace, "peak_device_bytes":
                                                   900 * mib}),
        "realized": result.realized.model_copy(update={"by_lr_multiplier": rows}),
        "delta_h1": result.delta_h1.model_copy(update={"se": None})})
    view = JobView(id="cuda-like", status="succeeded", result=odd)
    board = dashboard.build([view], detail="*")
    json.dumps(board.model_dump(mode="json"), allow_nan=False)
    memory = figures.memory_figure(view)
    dashed = [t for t in memory["data"] if t.get("line", {}).get("dash") == "dash"]
    assert [t["y"] for t in dashed] == [[510, 510], [900, 900], [700, 700]]
    assert "peak device 900 MiB" in memory["layout"]["annotations"][0]["text"]

    # an out-of-memory failure keeps its trace: the memory plot shows where it grew
    from schemas import ProbeJob
    failed = ProbeJob.model_validate({
        "id": "oom", "status": "failed", "created_at": "2026-01-01T00:00:00Z",
        "error": {"code": "out_of_memory", "message": "CUDA out of memory", "phase": "gradients",
                  "memory_trace": [t.model_dump() for t in trace[:2]]}})
    board = dashboard.build([JobView.from_job(failed), view], detail="oom")
    plots = board.details["oom"]
    assert plots.lr_curve is None and "up to the failure" in plots.memory["layout"]["title"]["text"]
    assert "peak device 900 MiB" in plots.memory["layout"]["annotations"][0]["text"]
    assert board.jobs[0].error.startswith("[out_of_memory] CUDA out of memory (gradients)")

    bad = tmp_path / "not-a-result.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="delta_h1"):
        JobView.from_file(bad)
    assert cli(["report", "--output", str(tmp_path / "none.html")]) == 2     # bad input
