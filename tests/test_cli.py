"""The `entropy-probe` command, each subcommand by subprocess: it works, it keeps the server's
rules and settings (`run` honours ENTROPY_PROBE_*: roots, the trainable-parameter guard, the host
budget, the job deadline, the save-target guard), and a bad input is one clean line naming the
field with exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ONE_THREAD, quick_request
from schemas import ProbeResult

TOKEN = "cli-token"
SERVER_ENV = {"api_token": TOKEN}
pytestmark = pytest.mark.timeout(300)
CLI = [sys.executable, "-m", "service.cli"]
EXIT_BAD_INPUT = 2


def cli(*args: str, roots: str | None = None, timeout: float = 180,
        **env: str) -> subprocess.CompletedProcess:
    """`entropy-probe ARGS` with ENTROPY_PROBE_<K>=v for each keyword (roots: the checkpoint
    roots; unset: the working directory, the default)."""
    full = {k: v for k, v in os.environ.items() if k not in (
        "ENTROPY_PROBE_CHECKPOINT_ROOTS", "ENTROPY_PROBE_API_TOKEN")}
    full.update(OMP_NUM_THREADS=ONE_THREAD,
                **{f"ENTROPY_PROBE_{k.upper()}": v for k, v in env.items()})
    if roots is not None:
        full["ENTROPY_PROBE_CHECKPOINT_ROOTS"] = roots
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout,
                          env=full)


def assert_bad_input(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr that says each of `words`, no traceback, nothing on stdout."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert proc.stdout == ""


@pytest.fixture
def roots(tiny_checkpoint) -> str:
    return os.path.dirname(tiny_checkpoint[0])


def write(tmp_path: Path, body: dict | str, name: str = "r.json") -> str:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


# -- run ---------------------------------------------------------------------------------------

def test_run_in_process(tiny_checkpoint, roots, tmp_path):
    out = tmp_path / "o.json"
    proc = cli("run", "--request", write(tmp_path, quick_request(tiny_checkpoint)), "--output",
               str(out), roots=roots)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = ProbeResult.model_validate_json(out.read_text())
    assert result.batch.num_prompts == 4
    assert "δH₁" in proc.stdout and "ΔH" in proc.stdout and "gradients" in proc.stderr


def test_run_reports_a_probe_error(tiny_checkpoint, roots, tmp_path):
    body = quick_request(tiny_checkpoint)
    body["checkpoint"]["adapter"] = tiny_checkpoint[0]      # exists, but not an adapter
    proc = cli("run", "--request", write(tmp_path, body), roots=roots)
    assert proc.returncode == 1 and "checkpoint_not_found" in proc.stderr
    assert "Traceback" not in proc.stderr


def _bad_run_requests(ck: tuple[str, str], tmp: Path) -> list[tuple[str, dict | str, tuple]]:
    """(name, request file content, words the message must hold)."""
    base, adapter = ck
    q = quick_request(ck)
    return [
        ("not JSON", '{"checkpoint": ', ("invalid request", "JSON")),
        ("a JSON array", "[]", ("invalid request", "request")),
        ("bad field", dict(q, generation={"max_new_tokens": 0}),
         ("generation.max_new_tokens", "greater than or equal to 1")),
        ("unknown field", dict(q, promtps=["x"]), ("promtps", "Extra inputs")),
        ("nested error", dict(q, rollouts=[dict(q["rollouts"][0], rewards=[1.0])]),
         ("rollouts.0", "one reward per response")),
        ("adapter outside the roots", dict(q, checkpoint={"base_model": base,
                                                          "adapter": str(tmp)}),
         ("checkpoint.adapter", "outside", "ENTROPY_PROBE_CHECKPOINT_ROOTS")),
        ("missing base", dict(q, checkpoint={"base_model": base + "-nope", "adapter": adapter}),
         ("checkpoint.base_model", "does not exist")),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_run_requests(("<base>", "<adapter>"),
                                                                   Path("<tmp>"))])
def test_run_bad_request_file_is_one_line_naming_the_field(tiny_checkpoint, roots, tmp_path,
                                                           name):
    body, words = {c[0]: c[1:] for c in _bad_run_requests(tiny_checkpoint, tmp_path)}[name]
    path = write(tmp_path, body)
    assert_bad_input(cli("run", "--request", path, roots=roots), path, *words)


def test_run_missing_request_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    assert_bad_input(cli("run", "--request", missing), missing, "No such file")


def test_run_refuses_to_overwrite_the_probed_adapter(tiny_checkpoint, roots, tmp_path):
    """As the server does (422): the probed adapter's own directory, one inside it, or the base
    are refused before anything loads, and no file of the checkpoint changes."""
    base, adapter = tiny_checkpoint
    before = {p: p.read_bytes() for d in (base, adapter) for p in Path(d).iterdir()
              if p.is_file()}
    for target in (adapter, os.path.join(adapter, "inner"), base):
        body = quick_request(tiny_checkpoint, save_updated_adapter_to=target)
        assert_bad_input(cli("run", "--request", write(tmp_path, body), roots=roots),
                         "save_updated_adapter_to", "name a new directory")
    assert {p: p.read_bytes() for p in before} == before
    fresh = tmp_path / "saved"
    body = quick_request(tiny_checkpoint, save_updated_adapter_to=str(fresh))
    ok = cli("run", "--request", write(tmp_path, body), roots=f"{roots}{os.pathsep}{tmp_path}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (fresh / "adapter_config.json").is_file()


def test_run_honours_the_server_settings(tiny_checkpoint, roots, tmp_path):
    """ENTROPY_PROBE_MAX_TRAINABLE_PARAMS, _HOST_BUDGET_BYTES and _MAX_JOB_SECONDS change what
    `run` does, as they change what the server's worker does."""
    base, _ = tiny_checkpoint
    full_model = dict(quick_request(tiny_checkpoint), checkpoint={"base_model": base})
    refused = cli("run", "--request", write(tmp_path, full_model), roots=roots,
                  max_trainable_params="1000")
    assert refused.returncode == 1 and "too_many_trainable_params" in refused.stderr
    assert "1,000" in refused.stderr

    out = {}
    for budget in ("0", None):              # 0: unit vectors do not fit, a second pass
        path = tmp_path / f"o-{budget}.json"
        env = {"host_budget_bytes": budget} if budget else {}
        proc = cli("run", "--request", write(tmp_path, quick_request(tiny_checkpoint)),
                   "--output", str(path), roots=roots, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[budget] = ProbeResult.model_validate_json(path.read_text())
    assert out["0"].passes.forward_grad == 2 * out[None].passes.forward_grad
    assert out["0"].delta_h1.total == pytest.approx(out[None].delta_h1.total, rel=1e-6)

    late = cli("run", "--request", write(tmp_path, quick_request(tiny_checkpoint)),
               roots=roots, max_job_seconds="0.001")
    assert late.returncode == 1 and "deadline_exceeded" in late.stderr


def test_run_honours_trust_remote_code(tiny_checkpoint, tmp_path):
    """A base whose config needs its own code: refused by default, naming the setting; with
    ENTROPY_PROBE_TRUST_REMOTE_CODE=true that code runs (it leaves a marker), as in the worker."""
    import shutil
    base, adapter = tiny_checkpoint
    remote = tmp_path / "remote_code"
    shutil.copytree(base, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code.marker"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    body = dict(quick_request(tiny_checkpoint), checkpoint={"base_model": str(remote),
                                                            "adapter": adapter})
    roots = f"{os.path.dirname(base)}{os.pathsep}{tmp_path}"
    refused = cli("run", "--request", write(tmp_path, body), roots=roots)
    assert refused.returncode == 1 and "ENTROPY_PROBE_TRUST_REMOTE_CODE" in refused.stderr
    assert not marker.exists()
    trusted = cli("run", "--request", write(tmp_path, body), roots=roots,
                  trust_remote_code="true")
    assert marker.exists(), trusted.stderr[-2000:]
    assert trusted.returncode == 1 and "Traceback" not in trusted.stderr   # EvilConfig is absent


def test_run_and_serve_refuse_a_bad_setting(tiny_checkpoint, roots, tmp_path):
    path = write(tmp_path, quick_request(tiny_checkpoint))
    assert_bad_input(cli("run", "--request", path, roots=roots, max_trainable_params="many"),
                     "ENTROPY_PROBE_MAX_TRAINABLE_PARAMS", "valid integer")
    assert_bad_input(cli("serve", "--port", "1", max_queue="0"), "ENTROPY_PROBE_MAX_QUEUE",
                     "greater than or equal to 1")


# -- submit, status ----------------------------------------------------------------------------

def test_cli_submit_wait_and_status(module_server, tiny_checkpoint, tmp_path):
    req = write(tmp_path, quick_request(tiny_checkpoint, seed=31))
    proc = cli("submit", req, "--wait", "--url", module_server.url, api_token=TOKEN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.splitlines()[0]
    assert "δH₁" in proc.stdout
    proc = cli("status", job_id, "--url", module_server.url, api_token=TOKEN, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "succeeded"
    proc = cli("status", job_id, "--url", module_server.url, timeout=60)
    assert proc.returncode == 1 and "401" in proc.stderr and "Traceback" not in proc.stderr


def test_submit_bad_request_file_never_reaches_the_server(tmp_path):
    """Refused before any connection: the URL leads nowhere."""
    url = "http://127.0.0.1:9"
    path = write(tmp_path, {"checkpoint": {"adapter": "a"}, "prompts": ["x"], "answers": ["y"],
                            "responses_per_prompt": 1})
    assert_bad_input(cli("submit", path, "--url", url), "responses_per_prompt")
    assert_bad_input(cli("submit", str(tmp_path / "nope.json"), "--url", url), "No such file")


def test_submit_and_status_bad_input_the_server_refuses(module_server, tiny_checkpoint,
                                                        tmp_path):
    outside = dict(quick_request(tiny_checkpoint), checkpoint={
        "base_model": tiny_checkpoint[0], "adapter": str(tmp_path)})
    assert_bad_input(cli("submit", write(tmp_path, outside), "--url", module_server.url,
                         api_token=TOKEN), "HTTP 422", "checkpoint.adapter", "outside")
    for job_id, words in (("no-such-job", "no job with id 'no-such-job'"),
                          ("../healthz", "Not Found")):      # the id never names another route
        assert_bad_input(cli("status", job_id, "--url", module_server.url, api_token=TOKEN,
                             timeout=60), "HTTP 404", words)


def test_status_without_a_server_is_one_line():
    proc = cli("status", "x", "--url", "http://127.0.0.1:9", timeout=60)
    assert proc.returncode == 1 and "cannot reach the server" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# -- tiny-checkpoint ---------------------------------------------------------------------------

def test_cli_tiny_checkpoint_flags(tmp_path):
    proc = cli("tiny-checkpoint", str(tmp_path / "ck"), "--vocab-size", "64", "--hidden-size",
               "16", "--layers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "ck" / "base" / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        64, 16, 1)
    assert (tmp_path / "ck" / "adapter" / "optimizer.pt").is_file()
    assert (tmp_path / "ck" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("flag,value,words", [("--layers", "0", "0 is not at least 1"),
                                              ("--hidden-size", "big", "'big' is not a whole")])
def test_tiny_checkpoint_bad_flag(tmp_path, flag, value, words):
    proc = cli("tiny-checkpoint", str(tmp_path / "ck"), flag, value)
    assert proc.returncode == EXIT_BAD_INPUT and flag in proc.stderr and words in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ck").exists()


def test_demo_bad_dir_is_one_line(tmp_path):
    a_file = write(tmp_path, "x", "not-a-dir")
    assert_bad_input(cli("demo", "--dir", a_file, timeout=60), "--dir", "is a file")


# -- report ------------------------------------------------------------------------------------

def test_report_bad_input_is_one_line(tmp_path):
    out = str(tmp_path / "r.html")
    not_ours = write(tmp_path, {"delta_h1": 1}, "x.json")
    for args, words in ((["--output", out], ("name result files",)),
                        ([str(tmp_path / "nope.json"), "--output", out], ("No such file",)),
                        ([write(tmp_path, "{", "bad.json"), "--output", out], ("not JSON",)),
                        ([not_ours, "--output", out], (not_ours, "neither a result nor a job"))):
        assert_bad_input(cli("report", *args, timeout=60), *words)
    assert not os.path.exists(out)


def test_every_setting_is_documented_once():
    """The README's settings table has one row per Settings field (and the CLI's URL)."""
    from service.settings import Settings
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = [f"ENTROPY_PROBE_{n.upper()}" for n in Settings.model_fields] + ["ENTROPY_PROBE_URL"]
    rows = {n: readme.count(f"| `{n}` |") for n in names}
    assert all(count == 1 for count in rows.values()), rows
