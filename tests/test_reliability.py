"""Issue 8: bad input, faults and load, with nothing lost. Real `entropy-probe serve` processes on
127.0.0.1 (the Server class and fixtures of conftest.py), real worker processes, tiny real
checkpoints. Every test stops by itself; the figures (requests, faults, failures, jobs lost) are
printed at the end of the module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server
from schemas import ErrorCode, JobStatus, ProbeJob, ProbeRequest
from faults import FAULT_SEED
from test_service import poll, quick_request, slow_request, wait_running

TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOAD_SECONDS = 20.0
pytestmark = pytest.mark.timeout(300)

FIGURES: Counter = Counter()      # printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_figures(request):
    yield
    line = ("[reliability] requests={requests} faults_injected={faults} failures={failures} "
            "jobs_accepted={jobs_accepted} jobs_lost={jobs_lost} (fuzz={fuzz_requests}, "
            "load={load_requests}, load 429s={load_429}, load jobs={load_jobs})").format_map(
        {k: FIGURES.get(k, 0) for k in ("requests", "faults", "failures", "jobs_accepted",
                                        "jobs_lost", "fuzz_requests", "load_requests",
                                        "load_429", "load_jobs")})
    line += f"; tests failed in this session: {request.session.testsfailed}"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n" + line)
        return
    with capture.global_and_fixture_disabled():        # shown even without -s
        print("\n" + line)


# -- no stack traces, no host paths -----------------------------------------------------------

def private_paths(server: Server) -> list[str]:
    """Host paths a client did not send and must never see: the server's working and state
    directories, the source tree, the interpreter, the user's cache, and any the test adds
    (`server.private`, e.g. where symlinks in a root lead)."""
    return [str(server.cwd), str(Path(server.env["ENTROPY_PROBE_STATE_DIR"]).resolve()),
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.prefix,
            sys.base_prefix, os.path.expanduser("~/.cache"), *getattr(server, "private", [])]


def assert_clean(text: str, server: Server) -> None:
    for needle in ("Traceback", 'File "', "site-packages", *private_paths(server)):
        assert needle not in text, f"{needle!r} leaked into a response: {text[:500]}"


def request(server: Server, method: str, path: str, **kw) -> httpx.Response:
    """One counted request; never a 5xx, never a leak."""
    r = server.http.request(method, path, **kw)
    FIGURES["requests"] += 1
    assert r.status_code < 500, (method, path, r.status_code, r.text[:500])
    assert r.headers.get("x-request-id")
    assert_clean(r.text, server)
    return r


def wait_job(server: Server, job_id: str) -> ProbeJob:
    job = poll(server, job_id, lambda j: j.status.finished)
    assert_clean(job.model_dump_json(), server)
    if job.error is not None:           # the server's own words: no terminal escapes either
        assert not any(c < " " and c not in "\n\t" for c in job.error.message), job.error
    return job


# -- a server over the tiny checkpoint and a directory of broken ones --------------------------

class _MarkerOnLoad:
    """Unpickling this creates a file: a stand-in for code a malicious optimizer.pt would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _param_count(path: str) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() for t in load_file(path).values())


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """Checkpoints that fail in every way a user can cause, built from real tiny ones."""
    from probe_core.tiny import TinyConfig, write_tiny_checkpoint
    base, adapter = map(Path, tiny_checkpoint)
    root = tmp_path_factory.mktemp("broken")
    outside = tmp_path_factory.mktemp("outside")
    write_tiny_checkpoint(str(root / "rank8"), TinyConfig(lora_rank=8))
    write_tiny_checkpoint(str(root / "wide"), TinyConfig(hidden_size=48))
    d = {"root": root, "outside": outside, "marker": outside / "unpickled.marker",
         "remote_marker": outside / "remote-code.marker"}

    def adapter_copy(name: str) -> Path:
        shutil.copytree(adapter, root / name)
        return root / name

    def base_copy(name: str) -> Path:
        shutil.copytree(base, root / name)
        return root / name

    os.remove(adapter_copy("no_optimizer") / "optimizer.pt")
    (adapter_copy("garbage_optimizer") / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip")
    real = (adapter / "optimizer.pt").read_bytes()
    (adapter_copy("truncated_optimizer") / "optimizer.pt").write_bytes(real[:len(real) // 2])
    torch.save({"state": {}, "param_groups": [], "x": _MarkerOnLoad(str(d["marker"]))},
               adapter_copy("pickle_optimizer") / "optimizer.pt")
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["eps"] = float("inf")
    torch.save(state, adapter_copy("inf_eps_optimizer") / "optimizer.pt")
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    for moments in state["state"].values():          # a run that diverged before it was saved
        moments["exp_avg"].fill_(float("nan"))
    torch.save(state, adapter_copy("nan_moments_optimizer") / "optimizer.pt")
    (adapter_copy("garbage_adapter") / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    # Pickled weights instead of safetensors, carrying code: loaders must refuse to run it.
    pickled = adapter_copy("pickle_adapter")
    os.remove(pickled / "adapter_model.safetensors")
    torch.save({"x": _MarkerOnLoad(str(d["marker"]))}, pickled / "adapter_model.bin")
    pickled = base_copy("pickle_base")
    os.remove(pickled / "model.safetensors")
    torch.save({"x": _MarkerOnLoad(str(d["marker"]))}, pickled / "pytorch_model.bin")
    (adapter_copy("garbage_adapter_config") / "adapter_config.json").write_text("{not json")
    (base_copy("garbage_tokenizer") / "tokenizer.json").write_text("{not json")
    (base_copy("garbage_config") / "config.json").write_text("{not json")
    weights = base_copy("truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A model that needs its own code, which would leave a marker if it ever ran.
    remote = base_copy("remote_code")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(d['remote_marker'])!r}, 'w').write('ran')\n")
    # Symlinks inside a root that resolve outside it.
    shutil.copytree(adapter, outside / "adapter")
    os.symlink(outside / "adapter", root / "link_to_outside")
    os.symlink(outside / "adapter" / "optimizer.pt", root / "optimizer_link.pt")
    d["limit"] = (_param_count(str(adapter / "adapter_model.safetensors"))
                  + _param_count(str(base / "model.safetensors"))) // 2
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, broken):
    """Token, OOM fault hook in teacher forcing, a LoRA guard between the adapter's and the full
    model's parameter counts; roots: the tiny checkpoint and the broken ones."""
    tmp = tmp_path_factory.mktemp("reliability-server")
    roots = os.pathsep.join([os.path.dirname(tiny_checkpoint[0]), str(broken["root"])])
    srv = Server(tmp, tmp / "state", roots, TOKEN, fault_hook="oom:teacher_forcing",
                 max_trainable_params=str(broken["limit"]), max_body_bytes="100000")
    srv.private = [str(broken["outside"])]
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def prompts_request(ck: tuple[str, str], seed: int = 0, **extra) -> dict:
    """A small sampled job: 2 prompts x 2 responses of at most 2 tokens."""
    base, adapter = ck
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "prompts": ["1+2=", "2+2="], "answers": ["3", "4"], "responses_per_prompt": 2,
            "generation": {"max_new_tokens": 2}, "seed": seed, **extra}


# -- 1. every field validated, with a 422 that names it ---------------------------------------

def _rollouts(*groups: tuple[list, list]) -> list[dict]:
    return [{"prompt": f"{i}+1=", "responses": r, "rewards": w} for i, (r, w) in enumerate(groups)]


def _invalid_bodies(ck: tuple[str, str]) -> list[tuple[str, dict | str | bytes, str, str]]:
    """(name, body, expected loc (dotted prefix), expected words in msg)."""
    base, adapter = ck
    p, q = prompts_request(ck), quick_request(ck)

    def with_(body: dict, **kw) -> dict:
        return {**json.loads(json.dumps(body)), **kw}

    def nested(body: dict, section: str, **kw) -> dict:
        out = json.loads(json.dumps(body))
        out[section] = {**out.get(section, {}), **kw}
        return out

    def raw_rewards(literal: str) -> str:      # JSON's non-standard NaN/Infinity literals
        return json.dumps(with_(q, rollouts=_rollouts((["a", "b"], [0.0, 1.0])))).replace(
            "[0.0, 1.0]", f"[{literal}, 1.0]")

    return [
        ("no prompts", with_(p, prompts=[], answers=[]), "body", "give prompts"),
        ("empty prompt", with_(p, prompts=["", "x"]), "body", "non-empty"),
        ("empty answer", with_(p, answers=["3", " "]), "body", "answers must be non-empty"),
        ("answers mismatch", with_(p, answers=["3"]), "body", "one entry per prompt"),
        ("no answers", {k: v for k, v in p.items() if k != "answers"}, "body",
         "one entry per prompt"),
        ("G = 1", with_(p, responses_per_prompt=1), "body.responses_per_prompt", "2"),
        ("rollout with 1 response", with_(q, rollouts=_rollouts((["a"], [1.0]))),
         "body.rollouts.0.responses", "at least 2"),
        ("rewards != responses", with_(q, rollouts=_rollouts((["a", "b"], [1.0]))),
         "body.rollouts.0", "one reward per response"),
        ("ragged G", with_(q, rollouts=_rollouts((["a", "b"], [1, 0]), (["a", "b", "c"],
                                                                          [1, 0, 0]))),
         "body", "same number of responses"),
        ("empty response", with_(q, rollouts=_rollouts((["a", ""], [1, 0]))),
         "body.rollouts.0", "is empty"),
        ("empty token list", with_(q, rollouts=_rollouts((["a", []], [1, 0]))),
         "body.rollouts.0", "is empty"),
        ("negative token id", with_(q, rollouts=_rollouts(([[3], [-1]], [1, 0]))),
         "body.rollouts.0.responses.1", "greater than or equal to 0"),
        ("token id true", with_(q, rollouts=_rollouts(([[3], [True]], [1, 0]))),
         "body.rollouts.0.responses.1", "valid integer"),
        ("token id 2**40", with_(q, rollouts=_rollouts(([[3], [2**40]], [1, 0]))),
         "body.rollouts.0.responses.1", "less than or equal"),
        ("max_new_tokens 0", nested(p, "generation", max_new_tokens=0),
         "body.generation.max_new_tokens", "greater than"),
        ("max_new_tokens absurd", nested(p, "generation", max_new_tokens=10**9),
         "body.generation.max_new_tokens", "less than or equal to 8192"),
        ("too many sequences", with_(p, prompts=["x"] * 65, answers=["y"] * 65,
                                     responses_per_prompt=1024), "body", "exceeds the limit"),
        ("top_k absurd", nested(p, "generation", top_k=10**30), "body.generation.top_k",
         "less than"),
        ("unknown enum prompt_format", with_(p, prompt_format="xml"), "body.prompt_format",
         "'raw' or 'chat'"),
        ("unknown enum reward", nested(p, "reward", kind="bleu"), "body.reward.kind",
         "exact_match"),
        ("unknown enum estimator", nested(p, "estimator", mode="magic"),
         "body.estimator.mode", "exact"),
        ("unknown field", with_(p, promtps=["x"]), "body.promtps", "Extra inputs"),
        ("unknown nested field", nested(p, "generation", temp=1.0), "body.generation.temp",
         "Extra inputs"),
        ("prompts not a list", with_(p, prompts="1+2="), "body.prompts", "valid list"),
        ("seed not a number", with_(p, seed="abc"), "body.seed", "valid integer"),
        ("seed fractional", with_(p, seed=1.5), "body.seed", "fractional"),
        ("seed negative", with_(p, seed=-1), "body.seed", "greater than"),
        ("enabled not a bool", nested(p, "realized", enabled="maybe"), "body.realized.enabled",
         "valid boolean"),
        ("checkpoint not an object", with_(p, checkpoint=base), "body.checkpoint",
         "dictionary"),
        ("checkpoint empty", with_(p, checkpoint={}), "body.checkpoint", "give checkpoint"),
        ("path empty", with_(p, checkpoint={"adapter": ""}), "body.checkpoint.adapter",
         "at least 1 character"),
        ("path with NUL", with_(p, checkpoint={"adapter": adapter + "\x00x"}),
         "body.checkpoint.adapter", "NUL"),
        ("path too long", with_(p, checkpoint={"adapter": "a" * 5000}),
         "body.checkpoint.adapter", "at most 4096"),
        ("save outside roots", with_(p, save_updated_adapter_to="/etc/probe"),
         "body.save_updated_adapter_to", "outside"),
        ("NaN reward literal", raw_rewards("NaN"), "body.rollouts.0.rewards.0", "finite"),
        ("Infinity reward literal", raw_rewards("-Infinity"), "body.rollouts.0.rewards.0",
         "finite"),
        ("1e999 reward", raw_rewards("1e999"), "body.rollouts.0.rewards.0", "finite"),
        ("'NaN' string reward", raw_rewards('"NaN"'), "body.rollouts.0.rewards.0", "finite"),
        ("NaN lr multiplier", nested(p, "realized", lr_multipliers=["NaN"]),
         "body.realized.lr_multipliers.0", "finite"),
        ("inf lr multiplier", nested(p, "realized", lr_multipliers=[1.0, "Infinity"]),
         "body.realized.lr_multipliers.1", "finite"),
        ("NaN lr override", nested(p, "optimizer_overrides", lr="nan"),
         "body.optimizer_overrides.lr", "finite"),
        ("inf max_grad_norm", nested(p, "optimizer_overrides", max_grad_norm="inf"),
         "body.optimizer_overrides.max_grad_norm", "finite"),
        ("inf length norm", nested(p, "objective", length_norm_constant="Infinity"),
         "body.objective.length_norm_constant", "finite"),
        ("reward 1e7", with_(q, rollouts=_rollouts((["a", "b"], [1e7, 0.0]))),
         "body.rollouts.0.rewards.0", "less than or equal to 1000000"),
        ("temperature 1e-4", nested(p, "generation", temperature=1e-4),
         "body.generation.temperature", "greater than or equal to 0.001"),
        ("length norm 1e-300", nested(p, "objective", length_norm_constant=1e-300),
         "body.objective.length_norm_constant", "greater than or equal to 0.001"),
        ("NaN temperature", nested(p, "generation", temperature="NaN"),
         "body.generation.temperature", "finite"),
        ("rollouts and prompts", with_(q, prompts=["x"], answers=["y"]), "body",
         "either rollouts or prompts"),
        ("rollouts without provided", nested(q, "reward", kind="exact_match"), "body",
         "provided"),
        ("provided without rollouts", nested(p, "reward", kind="provided"), "body",
         "needs rollouts"),
        ("num_prompts too big", with_(p, num_prompts=3), "body", "only 2 prompts"),
        ("blocks do not divide", nested(p, "estimator", mode="blocks", block_size=3), "body",
         "must divide"),
        ("lone surrogate", json.dumps(with_(p, prompts=["1+2=\ud800", "x"])), "body",
         "valid Unicode"),
        ("lone surrogate key", json.dumps(with_(p, **{"\udc00": 1})), "body", "valid Unicode"),
        ("malformed JSON", '{"checkpoint": ', "body", "JSON decode error"),
        ("trailing garbage", json.dumps(p) + " x", "body", "JSON decode error"),
        ("empty body", "", "body", "Field required"),
        ("JSON array", "[]", "body", "dictionary"),
        ("JSON null", "null", "body", "dictionary"),
        ("JSON number", "42", "body", "dictionary"),
    ]


def test_every_bad_field_is_a_422_that_names_it(server, tiny_checkpoint):
    before = request(server, "GET", "/probes", params={"limit": 100}).json()["data"]
    for name, body, loc, words in _invalid_bodies(tiny_checkpoint):
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        r = request(server, "POST", "/probes", headers={"content-type": "application/json"},
                    content=content.encode("utf-8", "surrogatepass") if isinstance(
                        content, str) else content)
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        hits = [e for e in detail if ".".join(map(str, e["loc"])).startswith(loc)
                and words in e["msg"]]
        assert hits, (name, detail)
        assert len(r.content) < 20_000, name          # the whole body is never echoed back
    after = request(server, "GET", "/probes", params={"limit": 100}).json()["data"]
    assert after == before                              # none of them became a job


def test_bodies_that_are_not_json_objects(server, tiny_checkpoint):
    valid = json.dumps(prompts_request(tiny_checkpoint)).encode()
    cases = [("text/plain", valid, 415), (None, valid, 415),
             ("application/x-www-form-urlencoded", b"a=b", 415),
             ("application/json", b"\xff\xfe\xfd", 400),
             ("application/json", b"[" * 5000 + b"]" * 5000, 400),
             # Deep, but within the JSON parser's limit: validation and the 422 echo cope.
             ("application/json", json.dumps(dict(prompts_request(tiny_checkpoint), prompts=[
                 json.loads("[" * 900 + '"x"' + "]" * 900)])).encode(), 422)]
    for content_type, content, status in cases:
        headers = {"content-type": content_type} if content_type else {}
        r = request(server, "POST", "/probes", content=content, headers=headers)
        assert r.status_code == status, (content_type, content[:20], r.text[:300])
        assert r.json()["detail"]


def test_odd_query_strings_and_ids(server):
    for path, status in (("/probes?limit=abc", 422), ("/probes?limit=0", 422),
                         ("/probes?status=bogus", 422), ("/probes?statuss=failed", 422),
                         ("/probes?after=%00", 404), ("/probes/%2e%2e", 404),
                         ("/probes/" + "a" * 5000, 404), ("/probes/x%00y", 404),
                         ("/probes/%ed%a0%80", 404), ("/probes/x/cancel", 404)):
        method = "POST" if path.endswith("/cancel") else "GET"
        r = request(server, method, path)
        assert r.status_code == status, (path, r.text[:300])
    r = request(server, "POST", "/probes", json={}, headers={"Idempotency-Key": "k" * 300})
    assert r.status_code == 422


def test_auth_is_never_a_500(server):
    with httpx.Client(base_url=server.url) as anon:
        for value in (b"Bearer", b"Basic cmVsaWFiaWxpdHk6", b"Bearer wrong",
                      b"Bearer " + TOKEN.encode() + b"x", b"Bearer " + b"x" * 8000,
                      b"Bearer \xff\xfe", TOKEN.encode(), b""):
            r = anon.get("/probes", headers={"Authorization": value})
            FIGURES["requests"] += 1
            assert r.status_code == 401, (value[:30], r.status_code, r.text[:200])
            assert r.headers["www-authenticate"] == "Bearer"


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(20):
            yield b" " * 10_000           # 200 kB of whitespace, no Content-Length
    r = request(server, "POST", "/probes", content=chunks(),
                headers={"content-type": "application/json"})
    assert r.status_code == 413 and "ENTROPY_PROBE_MAX_BODY_BYTES" in r.json()["detail"]


def test_broken_http_then_the_server_still_serves(server):
    """Half-sent bodies, garbage request lines, a client that vanishes mid-request."""
    import socket
    port = int(server.url.rsplit(":", 1)[1])
    payloads = [
        b"POST /probes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{\"checkpoint\": ",                # then hang up
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",                        # header without ':'
        b"POST /probes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\xff" * 100,
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            try:
                reply = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                reply = b""
        FIGURES["requests"] += 1
        assert not reply.startswith(b"HTTP/1.1 5"), (payload[:40], reply[:200])
        assert b"Traceback" not in reply
    assert request(server, "GET", "/healthz").status_code == 200
    assert request(server, "GET", "/probes").status_code == 200


# -- 3. security: roots, symlinks, pickles, remote code ---------------------------------------

def test_symlinks_that_leave_the_roots_are_refused(server, tiny_checkpoint, broken):
    base, adapter = tiny_checkpoint
    for field, value, loc in (
            ("adapter", str(broken["root"] / "link_to_outside"), "adapter"),
            ("optimizer", str(broken["root"] / "optimizer_link.pt"), "optimizer"),
            ("adapter", str(broken["root"] / "link_to_outside" / ".." / "x"), "adapter")):
        body = prompts_request(tiny_checkpoint)
        body["checkpoint"][field] = value
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 422, (field, value, r.text)
        [err] = r.json()["detail"]
        assert err["loc"] == ["body", "checkpoint", loc] and "outside" in err["msg"]
        assert str(broken["outside"]) not in r.text     # the target is never named


def test_a_symlink_swapped_in_after_submit_is_refused_at_load(server, tiny_checkpoint, broken):
    """Paths are checked at submit and again, resolved, when the worker opens them."""
    swap = broken["root"] / "swapped_adapter"
    shutil.copytree(tiny_checkpoint[1], swap)
    ahead = request(server, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    body = dict(prompts_request(tiny_checkpoint),
                checkpoint={"base_model": tiny_checkpoint[0], "adapter": str(swap)})
    target = request(server, "POST", "/probes", json=body)
    assert target.status_code == 202                  # a real directory inside the roots
    shutil.rmtree(swap)
    os.symlink(broken["outside"] / "adapter", swap)   # now it leads outside
    request(server, "POST", f"/probes/{ahead}/cancel")
    FIGURES["jobs_accepted"] += 2
    FIGURES["faults"] += 1
    job = wait_job(server, target.json()["id"])
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.invalid_request
    assert job.error.phase == "load" and "outside" in job.error.message
    assert wait_job(server, ahead).status == JobStatus.cancelled


def test_save_updated_adapter_never_overwrites_a_checkpoint(server, tiny_checkpoint, broken):
    base, adapter = tiny_checkpoint
    before = {p.name: p.read_bytes() for p in Path(adapter).iterdir() if p.is_file()}
    for target, words in ((adapter, "already holds"), (base, "already holds"),
                          (str(Path(adapter) / "optimizer.pt"), "existing file")):
        body = prompts_request(tiny_checkpoint, save_updated_adapter_to=target)
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 422, (target, r.text)
        [err] = r.json()["detail"]
        assert err["loc"] == ["body", "save_updated_adapter_to"] and words in err["msg"]
    fresh = str(broken["root"] / "saved-once")
    body = prompts_request(tiny_checkpoint, save_updated_adapter_to=fresh)
    job = wait_job(server, request(server, "POST", "/probes", json=body).json()["id"])
    FIGURES["jobs_accepted"] += 1
    assert job.status == JobStatus.succeeded, job.error
    assert job.result.updated_adapter and (Path(fresh) / "adapter_config.json").is_file()
    again = request(server, "POST", "/probes", json=body)      # it holds an adapter now
    assert again.status_code == 422 and "already holds" in again.text
    assert {p.name: p.read_bytes() for p in Path(adapter).iterdir() if p.is_file()} == before


# -- 2. runtime faults become failed jobs; the service goes on --------------------------------

def _broken_jobs(ck: tuple[str, str], b: dict) -> list[tuple[str, dict, str, str, str]]:
    """(name, checkpoint, expected code, expected phase, words in the message)."""
    base, adapter = ck
    r = b["root"]
    return [
        ("no optimizer state", {"base_model": base, "adapter": str(r / "no_optimizer")},
         "optimizer_state_missing", "load", "optimizer.pt"),
        ("garbage optimizer file", {"base_model": base, "adapter": str(r / "garbage_optimizer")},
         "checkpoint_invalid", "load", "optimizer"),
        ("truncated optimizer file", {"base_model": base,
                                      "adapter": str(r / "truncated_optimizer")},
         "checkpoint_invalid", "load", "optimizer"),
        ("pickle in optimizer.pt", {"base_model": base, "adapter": str(r / "pickle_optimizer")},
         "unsafe_checkpoint", "load", "unpickle"),
        ("another adapter's optimizer state", {"base_model": base, "adapter": adapter,
                                               "optimizer": str(r / "rank8/adapter/optimizer.pt")},
         "optimizer_state_mismatch", "load", "lora_A"),
        ("optimizer with eps=inf", {"base_model": base, "adapter": str(r / "inf_eps_optimizer")},
         "checkpoint_invalid", "load", "eps=inf"),
        ("optimizer state with NaN moments", {"base_model": base,
                                              "adapter": str(r / "nan_moments_optimizer")},
         "invalid_request", "step", "came out nan"),
        ("adapter of another base", {"base_model": str(r / "wide/base"), "adapter": adapter},
         "adapter_base_mismatch", "load", "adapter"),
        ("no adapter, too many parameters", {"base_model": base},
         "too_many_trainable_params", "load", "allow_full_model"),
        ("unreadable tokenizer", {"base_model": str(r / "garbage_tokenizer"), "adapter": adapter},
         "tokenizer_error", "load", "tokenizer"),
        ("unreadable config.json", {"base_model": str(r / "garbage_config"), "adapter": adapter},
         "checkpoint_invalid", "load", "config.json"),
        ("truncated base weights", {"base_model": str(r / "truncated_weights"),
                                    "adapter": adapter},
         "checkpoint_invalid", "load", "weights"),
        ("garbage adapter weights", {"base_model": base, "adapter": str(r / "garbage_adapter")},
         "checkpoint_invalid", "load", "adapter"),
        ("pickled adapter weights", {"base_model": base, "adapter": str(r / "pickle_adapter")},
         "unsafe_checkpoint", "load", "adapter"),
        ("pickled base weights", {"base_model": str(r / "pickle_base"), "adapter": adapter},
         "unsafe_checkpoint", "load", "base model"),
        ("unreadable adapter_config.json", {"base_model": base,
                                            "adapter": str(r / "garbage_adapter_config")},
         "checkpoint_invalid", "load", "adapter"),
        ("model that needs remote code", {"base_model": str(r / "remote_code"),
                                          "adapter": adapter},
         "checkpoint_invalid", "load", "ENTROPY_PROBE_TRUST_REMOTE_CODE"),
    ]


def test_broken_checkpoints_fail_with_code_and_phase_then_a_good_job_succeeds(
        server, tiny_checkpoint, broken):
    pid = server.wait_ready()
    good = prompts_request(tiny_checkpoint, seed=5)
    first = wait_job(server, request(server, "POST", "/probes", json=good).json()["id"])
    assert first.status == JobStatus.succeeded, first.error
    submitted = []
    for name, checkpoint, code, phase, words in _broken_jobs(tiny_checkpoint, broken):
        body = dict(prompts_request(tiny_checkpoint), checkpoint=checkpoint)
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 202, (name, r.text)
        submitted.append((name, r.json()["id"], code, phase, words))
    oom = request(server, "POST", "/probes", json=quick_request(tiny_checkpoint, seed=FAULT_SEED))
    submitted.append(("simulated OOM", oom.json()["id"], "out_of_memory", "teacher_forcing",
                      "microbatch"))
    FIGURES["jobs_accepted"] += len(submitted)
    FIGURES["faults"] += len(submitted)
    wrong = []
    for name, job_id, code, phase, words in submitted:
        job = wait_job(server, job_id)
        got = (job.status, job.error and job.error.code.value, job.error and job.error.phase)
        if got != (JobStatus.failed, code, phase) or words not in job.error.message:
            wrong.append((name, got, job.error and job.error.message))
    assert not wrong, "\n".join(map(str, wrong))
    assert not broken["marker"].exists(), "unpickling optimizer.pt ran code"
    assert not broken["remote_marker"].exists(), "the model's own code ran"
    FIGURES["jobs_accepted"] += 2
    again = wait_job(server, request(server, "POST", "/probes", json=good).json()["id"])
    assert again.status == JobStatus.succeeded, again.error
    # The same job gives the same numbers: no failure left anything behind in the worker
    # (e.g. adapter layers in the cached base).
    for part in ("delta_h1", "batch", "proxies"):
        assert getattr(again.result, part) == getattr(first.result, part), part
    assert again.result.realized.delta_h == first.result.realized.delta_h
    assert server.wait_ready() == pid                   # one worker survived all of it


# -- 4a. fuzzing: the OpenAPI schema (schemathesis) and mutated requests (hypothesis) ----------

FUZZ_EXAMPLES = 60             # per operation and mode (positive, negative)
MUTATIONS = 300


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """Its only checkpoint root holds empty `base` and `adapter` directories: a request that
    passes every check at submit is queued, then fails at once in the worker (no config.json),
    so the fuzz never runs real probes. A queue of 2 bounds what it can pile up."""
    tmp = tmp_path_factory.mktemp("fuzz-server")
    root = tmp / "root"
    (root / "base").mkdir(parents=True)
    (root / "adapter").mkdir()
    (tmp / "cwd").mkdir()
    srv = Server(tmp / "cwd", tmp / "state", str(root), TOKEN, max_queue="2")
    srv.root = root
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _hypothesis(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _accepted_jobs_finish(server: Server) -> int:
    """Every job the server accepted is listed and reaches a finished state. Returns how many."""
    ids, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = request(server, "GET", "/probes", params=params).json()
        ids += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = ids[-1]
    for job_id in ids:
        job = wait_job(server, job_id)
        assert job.status.finished
    return len(ids)


def _paths(value, prefix=()) -> list[tuple]:
    """Every location inside a JSON value (dict keys and list indices)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", " ", "NaN", "Infinity", "-inf", "1e999", "\x00", "\ud800", "..",
                     "/etc/passwd", "raw", "chat", "provided", "blocks", "global", "7"]),
    st.lists(st.integers(-3, 2**32), max_size=3), st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 2), max_size=2))


def _mutate(data, body: dict) -> tuple[dict, tuple]:
    body = json.loads(json.dumps(body))
    where = data.draw(st.sampled_from(_paths(body)[1:]))
    parent = body
    for key in where[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[where[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(ODD_VALUES)
    else:
        parent[where[-1]] = data.draw(ODD_VALUES)
    return body, where


def test_mutated_requests_get_exactly_the_schema_verdict(fuzz_server):
    """Each request is a valid one with one value replaced, removed or added. The server must
    agree with ProbeRequest on it: valid → 202 (or 429, or 422 for a path), invalid → 422;
    never a 5xx, never a leak. Raw bytes cut or flipped at random never make a 5xx either."""
    root = fuzz_server.root
    ck = (str(root / "base"), str(root / "adapter"))
    bases = [prompts_request(ck), quick_request(ck),
             dict(quick_request(ck), rollouts=_rollouts(([[5, 6], [7]], [1.0, 0.0]),
                                                        ([[8], [9, 1]], [0.0, 0.5])))]
    seen: Counter = Counter()

    @_hypothesis(MUTATIONS)
    @given(data=st.data())
    def mutate(data):
        body, where = _mutate(data, data.draw(st.sampled_from(bases)))
        text = json.dumps(body)
        try:
            ProbeRequest.model_validate(json.loads(text))
            valid = True
        except ValueError:
            valid = False
        r = request(fuzz_server, "POST", "/probes", content=text.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"})
        seen[(valid, r.status_code)] += 1
        if not valid:
            assert r.status_code == 422, (where, text[:300], r.text[:300])
            assert isinstance(r.json()["detail"], list)
        elif r.status_code == 422:       # schema-valid, but a path is missing or outside the roots
            assert all(e["type"] in ("checkpoint_not_found", "invalid_request") and
                       e["loc"][1] in ("checkpoint", "save_updated_adapter_to")
                       for e in r.json()["detail"]), (where, r.text[:300])
        else:
            assert r.status_code in (202, 429), (where, r.status_code, r.text[:300])

    @_hypothesis(MUTATIONS // 3)
    @given(data=st.data())
    def corrupt(data):
        raw = json.dumps(data.draw(st.sampled_from(bases))).encode()
        cut = data.draw(st.integers(0, len(raw)))
        if data.draw(st.booleans()):
            raw = raw[:cut]
        else:
            raw = raw[:cut] + bytes([data.draw(st.integers(0, 255))]) + raw[cut + 1:]
        r = request(fuzz_server, "POST", "/probes", content=raw,
                    headers={"content-type": "application/json"})
        seen[("bytes", r.status_code)] += 1
        assert r.status_code in (202, 400, 422, 429), (raw[:200], r.text[:300])

    mutate()
    corrupt()
    FIGURES["fuzz_requests"] += sum(seen.values())
    accepted = _accepted_jobs_finish(fuzz_server)
    FIGURES["jobs_accepted"] += accepted
    print(f"\n[mutations] (schema-valid, status) counts: {dict(seen)}; "
          f"{accepted} accepted jobs all finished")
    assert seen[(False, 422)] > MUTATIONS // 4         # the fuzz really sent invalid requests


def _fuzz_operation(op, mode, server: Server, failures: dict, statuses: Counter) -> None:
    """Up to FUZZ_EXAMPLES generated requests for one operation; checks run on each answer."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection,
                                     not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
    from schemathesis.core.failures import Failure, FailureGroup

    checks = [not_a_server_error, response_schema_conformance, status_code_conformance,
              content_type_conformance, negative_data_rejection]
    negative = mode == GenerationMode.NEGATIVE
    # Negative cases keep the token: they break the request, not the credentials
    # (test_auth_is_never_a_500 covers those).
    strategy = op.as_strategy(generation_mode=mode, headers=AUTH if negative else None)

    @_hypothesis(FUZZ_EXAMPLES)
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=server.url, timeout=30)
        FIGURES["requests"] += 1
        FIGURES["fuzz_requests"] += 1
        statuses[(op.label, response.status_code)] += 1
        assert_clean(response.text, server)
        try:
            case.validate_response(response, checks=checks)
        except (Failure, FailureGroup) as exc:     # collected: one report for all of them
            failures.setdefault(f"{op.label} {mode.value}: {str(exc)[:200]}", str(exc)[:2000])

    try:
        run()
    except Unsatisfiable:                 # no way to break a route that takes no input
        assert negative


def test_openapi_fuzz_no_5xx_and_responses_match_the_schema(fuzz_server):
    """Schemathesis, from /openapi.json: no 5xx; every status code, content type and body is
    the documented one; requests that break the schema are refused."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig

    root = fuzz_server.root            # one real (failed) job, so the lists it reads hold one
    seeded = request(fuzz_server, "POST", "/probes", json=prompts_request(
        (str(root / "base"), str(root / "adapter")), seed=99))
    assert wait_job(fuzz_server, seeded.json()["id"]).error.code == ErrorCode.checkpoint_not_found
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {
        "bearer": TOKEN}}}})
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=config)
    failures: dict[str, str] = {}
    statuses: Counter = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(op, mode, fuzz_server, failures, statuses)
    print(f"\n[fuzz] {sum(statuses.values())} requests by status: "
          f"{dict(Counter(code for (_, code) in statuses.elements()))}")
    FIGURES["failures"] += len(failures)
    assert not failures, "\n\n".join(failures.values())
    assert not any(code >= 500 for (_, code) in statuses)
    assert _accepted_jobs_finish(fuzz_server) > 0


# -- 4b. load: pollers and submitters against one server, nothing lost -------------------------

SUBMITTERS, POLLERS = 3, 4            # and one canceller


def test_load_no_5xx_and_every_accepted_job_finishes(start_server, tiny_checkpoint):
    server = start_server(max_queue="3")
    accepted: list[str] = []
    keyed: dict[str, set[str]] = {}
    counts: Counter = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS

    def note(r: httpx.Response | None, what: str) -> None:
        with lock:
            counts["requests"] += 1
            if r is None:
                problems.append(f"{what}: transport error")
                return
            counts[r.status_code] += 1
            if r.status_code >= 500:
                problems.append(f"{what}: {r.status_code} {r.text[:200]}")

    def call(client: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            problems.append(f"{method} {path}: {type(exc).__name__}")
            return None
        note(r, f"{method} {path}")
        return r

    def submitter(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            n = 0
            while time.monotonic() < stop:
                n += 1
                # Every 4th submission repeats one of three idempotency keys (same body).
                key = f"load-key-{n % 3}" if n % 4 == 0 else None
                body = prompts_request(tiny_checkpoint, seed=777 if key else 1000 * k + n)
                r = call(client, "POST", "/probes", json=body,
                         headers={"Idempotency-Key": key} if key else {})
                if r is None:
                    continue
                if r.status_code == 202:
                    with lock:
                        accepted.append(r.json()["id"])
                        if key:
                            keyed.setdefault(key, set()).add(r.json()["id"])
                elif r.status_code == 429:
                    assert int(r.headers["retry-after"]) > 0
                    time.sleep(0.2)
                else:
                    problems.append(f"submit: {r.status_code} {r.text[:200]}")

    def poller(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            n = 0
            while time.monotonic() < stop:
                n += 1
                with lock:
                    some = accepted[(n * 7 + k) % len(accepted)] if accepted else "none"
                path = ["/healthz", "/readyz", "/metrics", "/probes?limit=100",
                        f"/probes/{some}", "/probes?status=succeeded&limit=5"][n % 6]
                r = call(client, "GET", path)
                if r is not None and r.status_code not in (200, 404 if some == "none" else 200):
                    problems.append(f"GET {path}: {r.status_code}")
                time.sleep(0.01)

    cancels: dict[str, str] = {}        # job id → status the cancel answered with

    def canceller() -> None:
        """Cancels a recent job every second: it may be queued, running or finished."""
        with httpx.Client(base_url=server.url, timeout=30) as client:
            n = 0
            while time.monotonic() < stop:
                time.sleep(1.0)
                n += 1
                with lock:      # the newest jobs, or a few back: queued, running or finished
                    target = next((j for j in accepted[::-1][n % 4:] if j not in cancels
                                   and j not in keyed_ids()), None)
                if target is None:
                    continue
                r = call(client, "POST", f"/probes/{target}/cancel")
                if r is not None and r.status_code == 200:
                    cancels[target] = r.json()["status"]
                elif r is not None and r.status_code != 409:      # 409: it already finished
                    problems.append(f"cancel: {r.status_code} {r.text[:200]}")

    def keyed_ids() -> set[str]:
        return set().union(*keyed.values()) if keyed else set()

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(SUBMITTERS)]
    threads += [threading.Thread(target=poller, args=(k,)) for k in range(POLLERS)]
    threads.append(threading.Thread(target=canceller))
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_SECONDS + 60)
    assert not any(t.is_alive() for t in threads)

    unique = set(accepted)              # a repeated idempotency key returns the same job
    assert all(len(ids) == 1 for ids in keyed.values()), keyed
    finished = [wait_job(server, job_id) for job_id in sorted(unique)]
    listed = set()
    after = None
    while True:
        page = server.http.get("/probes", params={"limit": 100, **(
            {"after": after} if after else {})}).json()
        listed |= {j["id"] for j in page["data"]}
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    lost = unique - listed
    # A job ends succeeded unless we cancelled it: cancelled at once if it was queued, and
    # cancelled or (when the worker finished first) succeeded if it was running.
    allowed = {"cancelled": {JobStatus.cancelled},
               "cancelling": {JobStatus.cancelled, JobStatus.succeeded}}
    not_ok = [(j.id, j.status.value, j.error) for j in finished
              if j.status not in allowed.get(cancels.get(j.id), {JobStatus.succeeded})]
    FIGURES["requests"] += counts["requests"]
    FIGURES["load_requests"] += counts["requests"]
    FIGURES["load_429"] += counts[429]
    FIGURES["load_jobs"] += len(unique)
    FIGURES["jobs_accepted"] += len(unique)
    FIGURES["jobs_lost"] += len(lost) + len(not_ok)
    FIGURES["failures"] += len(problems)
    print(f"\n[load] {LOAD_SECONDS:.0f} s, {SUBMITTERS} submitters + {POLLERS} pollers: "
          f"{counts['requests']} requests, statuses "
          f"{ {k: v for k, v in counts.items() if k != 'requests'} }, {len(unique)} jobs "
          f"accepted, {sum(j.status == JobStatus.succeeded for j in finished)} succeeded, "
          f"{sum(j.status == JobStatus.cancelled for j in finished)} cancelled "
          f"({len(cancels)} cancel requests accepted), {len(lost)} lost")
    assert not problems, problems[:10]
    assert unique and not lost and not not_ok, (lost, not_ok[:3])
    assert counts[429] > 0                   # the queue limit was really exercised


# -- 4c. faults: the worker killed while idle, while starting, mid-job ------------------------

def _worker_children(server: Server) -> list[psutil.Process]:
    """Live worker processes of the server (not multiprocessing's resource tracker)."""
    out = []
    for p in psutil.Process(server.proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:             # it exited while we looked
            pass
    return out


def test_worker_killed_idle_starting_and_mid_job_nothing_lost(start_server, tiny_checkpoint):
    server = start_server()
    first = server.wait_ready()
    os.kill(first, signal.SIGTERM)                       # idle
    FIGURES["faults"] += 1
    deadline = time.monotonic() + 60
    starting = []
    while not starting and time.monotonic() < deadline:  # kill its replacement while it starts
        starting = [p for p in _worker_children(server) if p.pid != first]
        time.sleep(0.01)
    assert starting, "no replacement worker was started"
    starting[0].kill()
    FIGURES["faults"] += 1
    starting[0].wait(30)                                 # gone (the supervisor reaps it)
    third = server.wait_ready(not_pid=starting[0].pid)
    assert third not in (first, starting[0].pid)

    slow = request(server, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    behind = [request(server, "POST", "/probes", json=prompts_request(tiny_checkpoint, seed=s))
              .json()["id"] for s in (1, 2)]
    FIGURES["jobs_accepted"] += 3
    assert wait_running(server, slow).status == JobStatus.running
    os.kill(third, signal.SIGKILL)                       # mid-job
    FIGURES["faults"] += 1
    crashed = wait_job(server, slow)
    assert crashed.status == JobStatus.failed and crashed.error.code == ErrorCode.worker_crashed
    assert "SIGKILL" in crashed.error.message and crashed.error.phase
    for job_id in behind:                                # the queued jobs were not lost
        job = wait_job(server, job_id)
        assert job.status == JobStatus.succeeded, job.error
    assert server.wait_ready() not in (first, third)
    metrics = request(server, "GET", "/metrics").text
    assert "entropy_probe_worker_restarts_total 3" in metrics


def test_stop_while_a_dead_worker_waits_to_be_replaced(start_server, tiny_checkpoint):
    """SIGTERM in the second after a worker died (before its successor starts): a clean
    shutdown, and the job queued meanwhile is reported interrupted after the restart."""
    server = start_server()
    os.kill(server.wait_ready(), signal.SIGKILL)
    FIGURES["faults"] += 2
    deadline = time.monotonic() + 30
    while "died (killed by SIGKILL)" not in server.read_log():
        assert time.monotonic() < deadline, server.read_log()[-2000:]
        time.sleep(0.01)
    queued = request(server, "POST", "/probes", json=prompts_request(tiny_checkpoint))
    server.proc.terminate()
    server.proc.wait(30)
    log = server.read_log()
    assert "Traceback" not in log and "shutdown failed" not in log, log[-3000:]
    again = start_server(state_dir=Path(server.env["ENTROPY_PROBE_STATE_DIR"]))
    job = request(again, "GET", f"/probes/{queued.json()['id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "interrupted"
    FIGURES["jobs_accepted"] += 1


# -- 4d. restart: damaged files in the state directory are skipped and logged -----------------

def test_restart_skips_damaged_job_files(start_server, tiny_checkpoint, tmp_path):
    state = tmp_path / "damaged-state"
    first = start_server(state_dir=state)
    done_id = request(first, "POST", "/probes", json=prompts_request(tiny_checkpoint)).json()["id"]
    done = wait_job(first, done_id)
    assert done.status == JobStatus.succeeded
    slow_id = request(first, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    queued_id = request(first, "POST", "/probes", json=prompts_request(tiny_checkpoint,
                                                                       seed=8)).json()["id"]
    wait_running(first, slow_id)
    first.stop()                                    # SIGTERM: a graceful stop mid-job
    FIGURES["faults"] += 1

    jobs = state / "jobs"
    good = (jobs / f"{done_id}.json").read_text()
    record = json.loads(good)
    record["job"].update(id="copied-running", status="running", result=None, finished_at=None)
    record["seq"] += 10
    (jobs / "copied-running.json").write_text(json.dumps(record))
    damaged = {"truncated": good[: len(good) // 2], "array": "[]", "empty": "",
               "no-seq": json.dumps({"job": record["job"]}), "bad-job": json.dumps(
                   {**record, "job": {"id": 1}}), "binary": b"\xff\xfe\x00\x01"}
    for name, content in damaged.items():
        path = jobs / f"{name}.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    (jobs / "leftover.json.tmp").write_text("{")
    FIGURES["faults"] += len(damaged)

    second = start_server(state_dir=state)
    again = request(second, "GET", f"/probes/{done_id}").json()
    assert again["status"] == "succeeded" and again["result"] == json.loads(
        done.model_dump_json())["result"]
    copied = request(second, "GET", "/probes/copied-running").json()
    assert copied["status"] == "failed" and copied["error"]["code"] == "interrupted"
    for job_id in (slow_id, queued_id):            # neither finished nor silently dropped
        job = request(second, "GET", f"/probes/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
    listed = {j["id"] for j in request(second, "GET", "/probes").json()["data"]}
    assert listed == {done_id, "copied-running", slow_id, queued_id}
    for name in damaged:
        assert (jobs / f"{name}.corrupt").exists() and not (jobs / f"{name}.json").exists()
    assert not (jobs / "leftover.json.tmp").exists()
    log = second.read_log()
    assert log.count("skipping unreadable job file") == len(damaged), log[-3000:]
    new = request(second, "POST", "/probes", json=prompts_request(tiny_checkpoint, seed=3))
    FIGURES["jobs_accepted"] += 4
    assert wait_job(second, new.json()["id"]).status == JobStatus.succeeded


# -- an unexpected error is a plain 500, and the connection stays usable -----------------------

def test_unexpected_error_is_a_plain_500_on_a_live_connection():
    """RequestId answers an exception that escapes the app itself. Starlette's outermost handler
    would answer and re-raise it, and uvicorn then closes the keep-alive connection, which a
    client that already sent its next request sees as a reset."""
    import uvicorn
    from fastapi import FastAPI

    from conftest import free_port
    from service.middleware import RequestId

    app = FastAPI()

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError(f"secret detail from {__file__}")

    @app.get("/ok")
    def ok() -> dict:
        return {"ok": True}

    app.add_middleware(RequestId)
    escaped: list[str] = []            # uvicorn logs, then closes the connection, on these

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            escaped.append(record.getMessage())

    uvicorn_log = logging.getLogger("uvicorn.error")
    handler = Collect(level=logging.ERROR)
    uvicorn_log.addHandler(handler)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(3):
                r = client.get("/boom", headers={"x-request-id": "req-1"})
                assert r.status_code == 500 and r.json() == {
                    "detail": "internal server error", "request_id": "req-1"}
                assert "secret" not in r.text and r.headers["x-request-id"] == "req-1"
                assert client.get("/ok").json() == {"ok": True}    # same pooled connection
    finally:
        server.should_exit = True
        thread.join(10)
        uvicorn_log.removeHandler(handler)
    assert not any("Exception in ASGI application" in m for m in escaped), escaped


def test_a_result_that_does_not_fit_the_schema_fails_the_job_and_frees_the_worker(tmp_path):
    """Were the supervisor to stop on such a result, the job would stay `running` and every
    later one `queued`, for ever. Real store, real supervisor (its worker is never started)."""
    from schemas import ProbeRequest as Req
    from service import worker as w
    from service.metrics import Metrics
    from service.store import JobStore
    from service.supervisor import Supervisor

    store = JobStore(tmp_path / "state")
    body = prompts_request(("base", "adapter"))
    ids = [store.create(Req.model_validate(dict(body, seed=s)), None, 8)[0].id for s in (1, 2)]
    sup = Supervisor(store, w.WorkerConfig("cpu", (), False, 0), Metrics())
    job_id, _ = store.take_next()
    sup.current = job_id
    sup._handle(None, w.JobDone(job_id, '{"delta_h1": {"total": null}}', False))
    job = store.get(job_id)
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.internal_error
    assert sup.current is None and store.take_next()[0] == ids[1]
