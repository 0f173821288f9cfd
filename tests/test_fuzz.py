"""Fuzzing: the OpenAPI schema (schemathesis) and mutated requests (hypothesis) against a real
server whose checkpoints are empty directories, so accepted jobs fail at once in the worker.
No 5xx, no leaks, the server's verdict equals ProbeRequest's, every accepted job finishes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FIGURES, RELIABILITY_AUTH as AUTH, RELIABILITY_TOKEN as TOKEN
from helpers import (Server, assert_clean, prompts_request, quick_request, request, rollouts,
                     wait_job)
from schemas import ErrorCode, ProbeRequest

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("report_figures")]

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
             dict(quick_request(ck), rollouts=rollouts(([[5, 6], [7]], [1.0, 0.0]),
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
    assert len(operations) == 11          # 8 of the API, 3 of /ui (page, assets, data)
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(op, mode, fuzz_server, failures, statuses)
    print(f"\n[fuzz] {sum(statuses.values())} requests by status: "
          f"{dict(Counter(code for (_, code) in statuses.elements()))}")
    FIGURES["failures"] += len(failures)
    assert not failures, "\n\n".join(failures.values())
    assert not any(code >= 500 for (_, code) in statuses)
    assert _accepted_jobs_finish(fuzz_server) > 0

