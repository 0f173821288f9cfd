"""bench/gpu_check.py runs end to end on tiny sizes (`--smoke`, CPU here) and writes one JSON
that covers every probe mode it knows (sampled, full-vocabulary, two-batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_writes_every_mode(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["smoke"] is True
    assert set(summary["modes"]) >= {"sampled", "full_vocabulary", "two_batch"}
    for mode, m in summary["modes"].items():
        assert m["cost"]["probe_over_training_step"] > 0
        assert all(r["mode"] == mode for r in m["memory_runs"])
    for mode, backward in (("sampled", 1), ("full_vocabulary", 2)):
        assert summary["modes"][mode]["cost"]["passes_per_sequence"]["backward"] == backward
