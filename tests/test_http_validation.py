"""HTTP validation: every bad field is a 422 that names it, bodies that are not JSON objects,
odd query strings, auth, body limits, broken HTTP, and an unexpected error as a plain 500. A real
guarded server (conftest `server`); no 5xx, no leaked paths; figures printed at the end."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from helpers import (FIGURES, RELIABILITY_TOKEN as TOKEN, prompts_request, quick_request,
                     request, rollouts)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("report_figures")]
PLACEHOLDER_CHECKPOINT = ("<base>", "<adapter>")     # the case names do not depend on it


def invalid_bodies(ck: tuple[str, str]) -> list[tuple[str, dict | str | bytes, str, str]]:
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
        return json.dumps(with_(q, rollouts=rollouts((["a", "b"], [0.0, 1.0])))).replace(
            "[0.0, 1.0]", f"[{literal}, 1.0]")

    return [
        ("no prompts", with_(p, prompts=[], answers=[]), "body", "give prompts"),
        ("empty prompt", with_(p, prompts=["", "x"]), "body", "non-empty"),
        ("empty answer", with_(p, answers=["3", " "]), "body", "answers must be non-empty"),
        ("answers mismatch", with_(p, answers=["3"]), "body", "one entry per prompt"),
        ("no answers", {k: v for k, v in p.items() if k != "answers"}, "body",
         "one entry per prompt"),
        ("G = 1", with_(p, responses_per_prompt=1), "body.responses_per_prompt", "2"),
        ("rollout with 1 response", with_(q, rollouts=rollouts((["a"], [1.0]))),
         "body.rollouts.0.responses", "at least 2"),
        ("rewards != responses", with_(q, rollouts=rollouts((["a", "b"], [1.0]))),
         "body.rollouts.0", "one reward per response"),
        ("ragged G", with_(q, rollouts=rollouts((["a", "b"], [1, 0]), (["a", "b", "c"],
                                                                          [1, 0, 0]))),
         "body", "same number of responses"),
        ("empty response", with_(q, rollouts=rollouts((["a", ""], [1, 0]))),
         "body.rollouts.0", "is empty"),
        ("empty token list", with_(q, rollouts=rollouts((["a", []], [1, 0]))),
         "body.rollouts.0", "is empty"),
        ("negative token id", with_(q, rollouts=rollouts(([[3], [-1]], [1, 0]))),
         "body.rollouts.0.responses.1", "greater than or equal to 0"),
        ("token id true", with_(q, rollouts=rollouts(([[3], [True]], [1, 0]))),
         "body.rollouts.0.responses.1", "valid integer"),
        ("token id 2**40", with_(q, rollouts=rollouts(([[3], [2**40]], [1, 0]))),
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
        ("reward 1e7", with_(q, rollouts=rollouts((["a", "b"], [1e7, 0.0]))),
         "body.rollouts.0.rewards.0", "less than or equal to 1000000"),
        ("temperature 1e-4", nested(p, "generation", temperature=1e-4),
         "body.generation.temperature", "greater than or equal to 0.001"),
        ("length norm 1e-300", nested(p, "objective", length_norm_constant=1e-300),
         "body.objective.length_norm_constant", "greater than or equal to 0.001"),
        ("inf entropy_coef", nested(p, "objective", entropy_coef="Infinity"),
         "body.objective.entropy_coef", "finite"),
        ("entropy_coef 1e9", nested(p, "objective", entropy_coef=1e9),
         "body.objective.entropy_coef", "less than or equal to 1000"),
        ("unknown length norm", nested(p, "objective", length_norm="token_sum"),
         "body.objective.length_norm", "token_mean"),
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
        ("entropy_batch of 1 prompt", with_(p, entropy_batch={"prompts": ["x"]}),
         "body.entropy_batch.prompts", "at least 2"),
        ("entropy_batch empty prompt", with_(p, entropy_batch={"prompts": ["x", ""]}),
         "body.entropy_batch", "non-empty"),
        ("entropy_batch G_E = 0", with_(p, entropy_batch={"prompts": ["x", "y"],
                                                          "responses_per_prompt": 0}),
         "body.entropy_batch.responses_per_prompt", "1"),
        ("per_prompt SNIS with G_E = 1",
         nested(with_(p, entropy_batch={"prompts": ["x", "y"]}), "realized",
                normalization="per_prompt"), "body", "responses_per_prompt >= 2"),
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



@pytest.mark.parametrize("name", [case[0] for case in invalid_bodies(PLACEHOLDER_CHECKPOINT)])
def test_every_bad_field_is_a_422_that_names_it(server, tiny_checkpoint, name):
    cases = {case[0]: case[1:] for case in invalid_bodies(tiny_checkpoint)}
    body, loc, words = cases[name]
    before = request(server, "GET", "/probes", params={"limit": 100}).json()["data"]
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
    assert after == before                        # it did not become a job


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



# -- an unexpected error is a plain 500, and the connection stays usable -----------------------

def test_unexpected_error_is_a_plain_500_on_a_live_connection():
    """RequestId answers an exception that escapes the app itself. Starlette's outermost handler
    would answer and re-raise it, and uvicorn then closes the keep-alive connection, which a
    client that already sent its next request sees as a reset."""
    import uvicorn
    from fastapi import FastAPI

    from service.demo import free_port
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

