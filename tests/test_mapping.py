"""service/mapping.py maps probe_core's dataclasses and the wire models field by field, and the
error codes probe_core raises are the contract's: a field dropped, renamed or added on one side,
or a new ProbeError code missing from ErrorCode or the README, fails here."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest
from pydantic import BaseModel

import probe_core
from helpers import quick_request
from probe_core import spec as core
from probe_core.errors import ProbeError
from schemas import ErrorCode, ProbeRequest, ProbeResult
from schemas import request as asked
from service.mapping import to_result, to_spec

ROOT = Path(__file__).resolve().parents[1]
# Request sections that probe_core takes as dataclasses of the same field names.
SAME_FIELDS = [(asked.CheckpointSpec, core.CheckpointSpec),
               (asked.GenerationSpec, core.GenerationSpec),
               (asked.ObjectiveSpec, core.ObjectiveSpec),
               (asked.EstimatorSpec, core.EstimatorSpec),
               (asked.RealizedSpec, core.RealizedSpec),
               (asked.EntropySpec, core.EntropySpec),
               (asked.ReportSpec, core.ReportSpec)]


@pytest.mark.parametrize("wire,dataclass", SAME_FIELDS, ids=[w.__name__ for w, _ in SAME_FIELDS])
def test_request_sections_and_spec_dataclasses_have_the_same_fields(wire, dataclass):
    assert set(wire.model_fields) == {f.name for f in dataclasses.fields(dataclass)}


def _non_default_request(ck: tuple[str, str]) -> ProbeRequest:
    """A request in which every mapped section field differs from probe_core's default."""
    base, adapter = ck
    return ProbeRequest.model_validate({
        "checkpoint": {"base_model": base, "adapter": adapter, "optimizer": adapter + "/o.pt",
                       "allow_full_model": True},
        "prompts": ["a", "b", "c", "d"], "answers": ["1", "2", "3", "4"], "num_prompts": 4,
        "prompt_format": "chat", "responses_per_prompt": 3,
        "generation": {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
                       "batch_size": 3},
        "reward": {"kind": "math_answer"},
        "objective": {"advantage": "standardized", "length_norm": "per_sequence",
                      "length_norm_constant": 3.0, "advantage_eps": 0.01,
                      "entropy_coef": 0.05, "target_delta_h": -0.1},
        "estimator": {"mode": "blocks", "block_size": 2},
        "entropy": {"normalization": "sequence", "estimator": "sampled"},
        "report": {"per_prompt": True},
        "optimizer_overrides": {"lr": 0.25, "max_grad_norm": 0.5},
        "realized": {"enabled": False, "normalization": "per_prompt", "psis": False,
                     "ess_threshold": 0.25, "lr_multipliers": [0.5, 2.0]},
        "memory": {"teacher_force_microbatch_size": 5, "trace": False,
                   "host_budget_bytes": 12345},
        "seed": 9, "save_updated_adapter_to": base + "-saved",
        "entropy_batch": {"prompts": ["e", "f", "g"], "responses_per_prompt": 2,
                          "num_prompts": 2}})


def test_every_spec_field_comes_from_the_request():
    """No spec field is left at its default: each one was mapped from the request."""
    spec = to_spec(_non_default_request(("b", "a")), host_budget_bytes=1)
    default = core.ProbeSpec(checkpoint=core.CheckpointSpec(None, None))
    for f in dataclasses.fields(core.ProbeSpec):
        got, was = getattr(spec, f.name), getattr(default, f.name)
        if f.name == "rollouts":                     # prompts in this request, none to map
            continue
        if was is None and f.name == "entropy_batch":    # optional section: its own defaults
            was = core.EntropyBatchSpec(prompts=[])
        if dataclasses.is_dataclass(got):
            for sub in dataclasses.fields(got):
                assert getattr(got, sub.name) != getattr(was, sub.name), (f.name, sub.name)
        else:
            assert got != was, f.name
    assert spec.host_budget_bytes == 12345
    assert to_spec(ProbeRequest.model_validate(quick_request(("b", "a"))),
                   host_budget_bytes=77).host_budget_bytes == 77
    rollouts = to_spec(ProbeRequest.model_validate(quick_request(("b", "a"))),
                       host_budget_bytes=1).rollouts
    assert rollouts[0].prompt == "1+2=" and rollouts[0].rewards == [1.0, 0.0, 0.5, 0.0]


def _models(model: BaseModel, where: str = "result"):
    """Every model inside `model` (itself included), with its dotted location."""
    yield where, model
    for name in model.model_fields:
        value = getattr(model, name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _models(item, f"{where}.{name}[{i}]")
        elif isinstance(value, BaseModel):
            yield from _models(value, f"{where}.{name}")


def test_every_result_field_is_mapped_by_name(tiny_checkpoint):
    """A real probe's outcome → ProbeResult: every field of every nested model was given by the
    mapping (none left to a default), so a probe_core field that is renamed or dropped fails
    here or in the mapping, never silently in the API."""
    from probe_core.probe import run_probe
    from probe_core.spec import RuntimeOptions

    spec = to_spec(ProbeRequest.model_validate(quick_request(tiny_checkpoint)),
                   host_budget_bytes=1 << 30)
    result = to_result(run_probe(spec, RuntimeOptions(device="cpu")), spec.checkpoint)
    unset = [(where, sorted(set(m.model_fields) - m.model_fields_set))
             for where, m in _models(result) if set(m.model_fields) - m.model_fields_set]
    assert not unset, unset
    assert ProbeResult.model_validate_json(result.model_dump_json()) == result


# -- error codes -------------------------------------------------------------------------------

def _probe_error_classes() -> set[type]:
    for info in pkgutil.walk_packages(probe_core.__path__, "probe_core."):
        importlib.import_module(info.name)
    found, todo = set(), [ProbeError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found


def _code_literals() -> set[str]:
    """Every `code = "..."` written in probe_core's source, imported or not."""
    codes = set()
    for path in (ROOT / "probe_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                assert isinstance(node.value, ast.Constant), f"{path}: a code that is no literal"
                codes.add(node.value.value)
    return codes


def test_every_probe_error_code_is_in_the_contract():
    classes = _probe_error_classes()
    codes = {cls.code for cls in classes} | _code_literals()
    assert len(classes) > 10 and "checkpoint_not_found" in codes
    contract = {c.value for c in ErrorCode}
    assert codes <= contract, sorted(codes - contract)
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in contract if f"`{c}`" not in readme]
    assert not missing, f"error codes the README does not explain: {missing}"


def _core_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def test_the_wire_and_probe_core_agree_on_every_default():
    """The request's defaults (the contract, in /openapi.json) are those a library caller of
    probe_core gets: a default changed on one side only fails here."""
    pairs = [(w.model_fields, {f.name: f for f in dataclasses.fields(d)}) for w, d in SAME_FIELDS]
    spec = {f.name: f for f in dataclasses.fields(core.ProbeSpec)}
    top = ProbeRequest.model_fields
    renamed = {"reward_kind": asked.RewardSpec.model_fields["kind"],
               "microbatch_size": asked.MemorySpec.model_fields["teacher_force_microbatch_size"],
               "trace_memory": asked.MemorySpec.model_fields["trace"]}
    pairs.append(({**{n: top[n] for n in spec if n in top}, **renamed}, spec))
    compared = 0
    for wire_fields, core_fields in pairs:
        for name, wf in wire_fields.items():
            cf = core_fields.get(name)
            if cf is None or wf.is_required() or dataclasses.is_dataclass(_core_default(cf)):
                continue
            assert wf.get_default(call_default_factory=True) == _core_default(cf), name
            compared += 1
    assert compared >= 20
