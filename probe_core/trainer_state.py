"""The training step of a TRL / HF Trainer `checkpoint-N` folder (result.checkpoint_step).

The Trainer saves `<output_dir>/checkpoint-<global_step>/` with a `trainer_state.json` whose
`global_step` is the same number; a probe of that folder reports it so results line up with the
run's own logs.
"""

from __future__ import annotations

import json
import os
import re

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
MAX_STATE_BYTES = 64 << 20        # log_history grows with the run; beyond this, use the name


def trainer_step(path: str | None) -> int | None:
    """The global step of the checkpoint folder `path`: `trainer_state.json`'s `global_step`
    when the folder has a readable one, else N of a folder named `checkpoint-N`, else None."""
    if not path:
        return None
    path = os.path.normpath(path)
    step = _state_step(os.path.join(path, TRAINER_STATE))
    if step is not None:
        return step
    match = CHECKPOINT_FOLDER.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def _state_step(state_file: str) -> int | None:
    try:
        if os.path.getsize(state_file) > MAX_STATE_BYTES:
            return None
        with open(state_file, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None                   # missing or not a Trainer's file: the name decides
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
