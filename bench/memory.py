"""Peak memory against batch size (issue 6).

Runs the probe at several B (prompts) and G (responses per prompt) on a 32k-vocabulary model,
each size in a fresh process (`entropy-probe run --request R.json`), and prints the peak memory
per size and the ratio largest/smallest. On CPU the peak is the child's max RSS measured from
outside (os.wait4's rusage for that one child); on CUDA it is the result's peak device memory.
The probe's own host-RSS peak (from its memory trace) is printed beside it.

    python -m bench.memory [--prompts 4 8 16 32 --groups 4 8 --tokens 40 --device cpu]
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

from bench.common import add_model_args, checkpoint, client_rollouts


def request(base: str, adapter: str, num_prompts: int, group: int, tokens: int, vocab: int,
            microbatch: int) -> dict:
    rollouts = [dataclasses.asdict(r) for r in
                client_rollouts(num_prompts, group, tokens, vocab, seed=num_prompts * 97 + group)]
    return {"checkpoint": {"base_model": base, "adapter": adapter},
            "rollouts": rollouts, "responses_per_prompt": group,
            "generation": {"max_new_tokens": tokens}, "reward": {"kind": "provided"},
            "memory": {"teacher_force_microbatch_size": microbatch}}


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
            "trace": result["memory"]["trace"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    add_model_args(ap)
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args()

    base, adapter = checkpoint(args.hidden, args.layers, args.rank, args.vocab)
    cuda = args.device.startswith("cuda")
    rows = []
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r="
          f"{args.rank}; ≤{args.tokens} new tokens, microbatch {args.microbatch}, device "
          f"{args.device}; each size in a fresh process\n")
    print(f"{'B':>4}{'G':>4}{'seqs':>6}{'max RSS MiB':>13}{'trace peak MiB':>16}"
          f"{'device peak MiB':>17}{'seconds':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for g in args.groups:
            for b in args.prompts:
                req = request(base, adapter, b, g, args.tokens, args.vocab, args.microbatch)
                m = run_one(req, args.device, args.threads, tmp)
                rows.append({"prompts": b, "group": g, **m})
                dev = m["peak_device_bytes"]
                print(f"{b:4d}{g:4d}{b * g:6d}{m['max_rss_bytes'] / 2**20:13.1f}"
                      f"{m['peak_host_rss_bytes'] / 2**20:16.1f}"
                      f"{(dev / 2**20 if dev is not None else float('nan')):17.1f}"
                      f"{m['seconds']:9.1f}", flush=True)
    key = "peak_device_bytes" if cuda else "max_rss_bytes"
    small = min(rows, key=lambda r: r["prompts"] * r["group"])
    large = max(rows, key=lambda r: r["prompts"] * r["group"])
    print(f"\npeak ({'device' if cuda else 'max RSS'}): largest/smallest size "
          f"(B={large['prompts']},G={large['group']} / B={small['prompts']},G={small['group']})"
          f" = {large[key] / small[key]:.3f}")
    for g in args.groups:
        by_b = {r["prompts"]: r for r in rows if r["group"] == g}
        lo, hi = min(by_b), max(by_b)
        print(f"G={g}: B={hi} / B={lo} = {by_b[hi][key] / by_b[lo][key]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
