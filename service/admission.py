"""What a request must pass beyond its schema before anything runs: every checkpoint path exists
and lies inside the checkpoint roots, and the save target would not overwrite a model, an adapter
or the probed checkpoint. The server answers these with a 422, `entropy-probe run` and `submit`
with exit status 2; both name the field."""

from __future__ import annotations

from probe_core.errors import ProbeError
from probe_core.paths import confine, destination_problem
from schemas import ProbeRequest


def path_errors(req: ProbeRequest, roots: list[str]) -> list[dict]:
    """Field errors ({type, loc, msg, input}, loc starting with "body", as in a 422) for the
    request's paths; empty when they are all acceptable."""
    ck = req.checkpoint
    fields = [(("checkpoint", "base_model"), ck.base_model, True),
              (("checkpoint", "adapter"), ck.adapter, True),
              (("checkpoint", "optimizer"), ck.optimizer, True),
              (("save_updated_adapter_to",), req.save_updated_adapter_to, False)]
    errors = []
    for loc, path, must_exist in fields:
        if path is None:
            continue
        try:
            resolved = confine(path, roots, what=loc[-1], must_exist=must_exist)
        except ProbeError as exc:
            errors.append({"type": exc.code, "loc": ["body", *loc], "msg": exc.message,
                           "input": path})
            continue
        except (ValueError, UnicodeError):      # the schema refuses these; never a 500
            errors.append({"type": "invalid_request", "loc": ["body", *loc],
                           "msg": f"{loc[-1]} is not a valid file name"})
            continue
        if loc == ("save_updated_adapter_to",) and (
                problem := destination_problem(resolved, [p for p in (ck.adapter, ck.base_model)
                                                          if p])):
            errors.append({"type": "invalid_request", "loc": ["body", *loc], "input": path,
                           "msg": problem})
    return errors
