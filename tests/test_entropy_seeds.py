"""Over many independent batches (prompts drawn independently from a pool of 32, fresh
responses), the full-vocabulary δH₁ spreads less than the sampled one on the same batches, and
the jackknife SE matches the spread (issue 13). The figures are printed for the closing note.
"""

from __future__ import annotations

import random
import statistics

import pytest

from exact_world import (PROMPT_POOL, SIX_TOKEN_WORLD, load_policy, sampled_rollouts)
from probe_core.checkpoint import ModelCache
from probe_core.probe import run_probe
from probe_core.spec import CheckpointSpec, EntropySpec, GenerationSpec, ProbeSpec, RealizedSpec
from probe_core.tiny import write_tiny_checkpoint

WORLD, POOL = SIX_TOKEN_WORLD, PROMPT_POOL[:32]
SEEDS, B, G, MAX_NEW = 60, 16, 4, 3
KINDS = [EntropySpec(n, e) for n in ("token_mean", "sequence")
         for e in ("full_vocabulary", "sampled")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """δH₁ and its SE per seed and kind, on the same batches for every kind."""
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("seeds")), WORLD)
    model, tok, _ = load_policy(base, adapter)
    a_id = tok.convert_tokens_to_ids("a")
    rng = random.Random(3)
    drawn = [POOL[rng.randrange(len(POOL))] for _ in range(SEEDS * B)]
    rollouts = sampled_rollouts(model, tok, drawn, G, MAX_NEW, seed=5,
                                reward_fn=lambda r: float(a_id in r))
    cache, rows = ModelCache(), {}
    for seed in range(SEEDS):
        batch = rollouts[seed * B:(seed + 1) * B]
        for kind in KINDS:
            spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=batch,
                             reward_kind="provided", responses_per_prompt=G, entropy=kind,
                             generation=GenerationSpec(max_new_tokens=MAX_NEW),
                             microbatch_size=8, realized=RealizedSpec(enabled=False))
            out = run_probe(spec, cache=cache)
            rows.setdefault((kind.normalization, kind.estimator), []).append(
                (out.delta_h1.total, out.delta_h1.se))
    return rows


def _sd_and_calibration(rows):
    totals, ses = [t for t, _ in rows], [s for _, s in rows]
    sd = statistics.stdev(totals)
    return sd, statistics.mean(ses) / sd


def test_full_vocabulary_spreads_less_and_jackknife_is_calibrated(study):
    print(f"\nδH₁ over {SEEDS} independent batches (B={B} prompts drawn from {len(POOL)}, G={G})")
    figures = {}
    for key, rows in study.items():
        sd, calibration = _sd_and_calibration(rows)
        figures[key] = (sd, calibration)
        print(f"  {key[0]:10} {key[1]:15} sd {sd:.5f}  mean jackknife SE / sd {calibration:.3f}")
    for norm in ("token_mean", "sequence"):
        full, sampled = figures[(norm, "full_vocabulary")][0], figures[(norm, "sampled")][0]
        print(f"  {norm}: sd full_vocabulary / sd sampled = {full / sampled:.3f}")
        assert full <= sampled
    assert 0.8 <= figures[("token_mean", "full_vocabulary")][1] <= 1.25
