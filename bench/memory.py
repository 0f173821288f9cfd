"""Peak memory against batch size, for the sampled and the full-vocabulary estimator (issues 6,
17).

Runs the probe (token-mean entropy, each estimator) at several B (prompts) and G (responses per
prompt), each size in a fresh process (`entropy-probe run --request R.json`), and prints the
peak memory per size and the ratios largest/smallest B side by side for both estimators. On
CPU the peak is the child's max RSS measured from outside (os.wait4's rusage for that one
child); on CUDA it is the result's peak device memory. Beside it: the probe's own host-RSS
peak (from its memory trace), the RSS after loading (the model's own footprint: weights,
adapter, libraries) and their difference, the probe's working memory.

    python -m bench.memory [--model tiny32k|qwen2.5-0.5b] [--prompts 4 8 16 32 --groups 4 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import ESTIMATORS, add_model_args, client_rollouts, resolve_model_args

TARGETS = {"tiny32k": 1.15, "qwen2.5-0.5b": 1.10}   # max RSS largest / smallest B (issue 17)
MEMORY_PROMPTS = {"tiny32k": [4, 8, 16, 32], "qwen2.5-0.5b": [4, 8, 16]}


def request(base: str, adapter: str, num_prompts: int, group: int, args, estimator: str
            ) -> dict:
    rollouts = [dataclasses.asdict(r) for r in
                client_rollouts(num_prompts, group, args.tokens, args.vocab,
                                seed=num_prompts * 97 + group)]
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "rollouts": rollouts, "responses_per_prompt": group,
            "generation": {"max_new_tokens": args.tokens}, "reward": {"kind": "provided"},
            "entropy": {"normalization": "token_mean", "estimator": estimator},
            "memory": {"teacher_force_microbatch_size": args.microbatch}}


def _command() -> list[str]:
    exe = shutil.which("entropy-probe") or os.path.join(os.path.dirname(sys.executable),
                                                        "entropy-probe")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-c", "import sys; from service.cli import main; "
            "sys.exit(main(sys.argv[1:]))"]


def run_one(req: dict, device: str, threads: int, workdir: str) -> dict:
    """Run one probe in a fresh process; returns its max RSS, wall time and result memory."""
    req_path, out_path = os.path.join(workdir, "request.json"), os.path.join(workdir, "out.json")
    with open(req_path, "w") as f:
        json.dump(req, f)
    # `run` keeps the server's rules: the checkpoint must lie inside the checkpoint roots.
    env = dict(os.environ, ENTROPY_PROBE_DEVICE=device, ENTROPY_PROBE_CHECKPOINT_ROOTS=
               os.path.dirname(os.path.abspath(req["checkpoint"]["base_model"])))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command() + ["run", "--request", req_path, "--output", out_path,
                                          "--device", device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    with open(out_path) as f:
        result = json.load(f)
    return {"max_rss_bytes": usage.ru_maxrss * 1024,           # Linux reports KiB
            "seconds": time.perf_counter() - t0,
            "peak_host_rss_bytes": result["memory"]["peak_host_rss_bytes"],
            "peak_device_bytes": result["memory"]["peak_device_bytes"],
            "rss_after_load_bytes": result["memory"]["trace"][0]["host_rss_bytes"],
            "trace": result["memory"]["trace"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=None)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    add_model_args(ap)
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args()
    if args.prompts is None:
        args.prompts = MEMORY_PROMPTS[args.model]
    base, adapter, description = resolve_model_args(args)
    cuda = args.device.startswith("cuda")
    rows = []
    print(f"model: {description}; ≤{args.tokens} new tokens, microbatch {args.microbatch}, "
          f"device {args.device}; each size in a fresh process\n")
    print(f"{'estimator':16}{'B':>4}{'G':>4}{'seqs':>6}{'max RSS MiB':>13}{'trace peak':>12}"
          f"{'after load':>12}{'peak-load':>11}{'device MiB':>12}{'seconds':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for g in args.groups:
            for b in args.prompts:
                for est in ESTIMATORS:
                    m = run_one(request(base, adapter, b, g, args, est), args.device,
                                args.threads, tmp)
                    rows.append({"estimator": est, "prompts": b, "group": g, **m})
                    dev = m["peak_device_bytes"]
                    print(f"{est:16}{b:4d}{g:4d}{b * g:6d}{m['max_rss_bytes'] / 2**20:13.1f}"
                          f"{m['peak_host_rss_bytes'] / 2**20:12.1f}"
                          f"{m['rss_after_load_bytes'] / 2**20:12.1f}"
                          f"{(m['max_rss_bytes'] - m['rss_after_load_bytes']) / 2**20:11.1f}"
                          f"{(dev / 2**20 if dev is not None else float('nan')):12.1f}"
                          f"{m['seconds']:9.1f}", flush=True)
    key = "peak_device_bytes" if cuda else "max_rss_bytes"
    target = TARGETS[args.model]
    print(f"\npeak ({'device' if cuda else 'max RSS'}), largest B / smallest B, side by side "
          f"(target ≤ {target}):")
    for g in args.groups:
        line = []
        for est in ESTIMATORS:
            by_b = {r["prompts"]: r for r in rows if r["group"] == g and r["estimator"] == est}
            lo, hi = min(by_b), max(by_b)
            ratio = by_b[hi][key] / by_b[lo][key]
            line.append(f"{est} {ratio:.3f}{'' if ratio <= target else ' ABOVE'}")
        print(f"  G={g}: B={hi} / B={lo}: " + ", ".join(line))
    for est in ESTIMATORS:
        mine = [r for r in rows if r["estimator"] == est]
        small = min(mine, key=lambda r: r["prompts"] * r["group"])
        large = max(mine, key=lambda r: r["prompts"] * r["group"])
        print(f"  {est}: largest/smallest size (B={large['prompts']},G={large['group']} / "
              f"B={small['prompts']},G={small['group']}) = {large[key] / small[key]:.3f}; "
              f"peak RSS minus the RSS after load at the largest: "
              f"{(large['max_rss_bytes'] - large['rss_after_load_bytes']) / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
