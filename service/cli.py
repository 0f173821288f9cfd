"""The `entropy-probe` command: serve, run, submit, status, report, tiny-checkpoint, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args):
    from service.client import ProbeClient
    return ProbeClient(args.url, token=os.environ.get("ENTROPY_PROBE_API_TOKEN"))


def cmd_serve(args) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    settings = Settings()
    if settings.api_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"entropy-probe serve: listening on {args.host} without ENTROPY_PROBE_API_TOKEN: "
              "anyone who can reach the port can run jobs", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_run(args) -> int:
    """In-process probe, no server."""
    from probe_core.errors import ProbeError
    from probe_core.probe import ProbeHooks, run_probe
    from probe_core.spec import RuntimeOptions
    from schemas import ProbeRequest
    from service.mapping import to_result, to_spec
    from service.settings import Settings
    from service.summary import progress_line, summarize

    with open(args.request) as f:
        req = ProbeRequest.model_validate_json(f.read())
    settings = Settings()
    opts = RuntimeOptions(device=args.device or settings.device,
                          trust_remote_code=settings.trust_remote_code)
    try:
        spec = to_spec(req, host_budget_bytes=settings.host_budget_bytes)
        outcome = run_probe(spec, opts, hooks=ProbeHooks(progress=progress_line))
    except ProbeError as exc:
        print(f"\nprobe failed [{exc.code}] in {exc.phase}: {exc.message}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    result = to_result(outcome, spec.checkpoint)
    if args.output:
        with open(args.output, "w") as f:
            f.write(result.model_dump_json(indent=2))
    print(summarize(result))
    return 0


def cmd_submit(args) -> int:
    from service.client import ProbeFailed
    from service.summary import progress_line, summarize

    with open(args.request) as f:
        body = json.load(f)
    with _client(args) as client:
        job_id = client.submit(body)
        print(job_id)
        if not args.wait:
            return 0
        try:
            result = client.wait(job_id, timeout=args.timeout, on_progress=lambda p:
                                 progress_line(p.phase, p.done, p.total))
        except ProbeFailed as exc:
            print(f"\n{exc}", file=sys.stderr)
            return 1
        print(file=sys.stderr)
        print(summarize(result))
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        print(client.get(args.id).model_dump_json(indent=2, exclude={"result": {"memory"}}))
    return 0


def cmd_report(args) -> int:
    from service.report import write_report
    if not args.files and args.url is None:
        raise ValueError("name result files (run --output), or --url of a service")
    n = write_report(args.files, args.output, url=args.url,
                     token=os.environ.get("ENTROPY_PROBE_API_TOKEN"), title=args.title)
    print(f"{args.output}: {n} jobs")
    return 0


def cmd_tiny(args) -> int:
    from probe_core.tiny import TinyConfig, write_tiny_checkpoint
    cfg = TinyConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers)
    base, adapter = write_tiny_checkpoint(args.dir, cfg)
    print(f"base model: {base}\nadapter:    {adapter} (with optimizer.pt)")
    return 0


def cmd_demo(args) -> int:
    from service.demo import run_demo
    return run_demo(args.dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-probe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (settings: ENTROPY_PROBE_* env)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="run one probe in this process (no server)")
    s.add_argument("--request", required=True, help="ProbeRequest JSON file")
    s.add_argument("--output", help="write the ProbeResult JSON here")
    s.add_argument("--device", help="auto | cpu | cuda:N (default ENTROPY_PROBE_DEVICE)")
    s.set_defaults(func=cmd_run)

    for name, func, helptext in (("submit", cmd_submit, "submit a request to a server"),
                                 ("status", cmd_status, "show a job")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("request" if name == "submit" else "id")
        s.add_argument("--url", default=os.environ.get("ENTROPY_PROBE_URL", DEFAULT_URL))
        if name == "submit":
            s.add_argument("--wait", action="store_true", help="poll until it finishes")
            s.add_argument("--timeout", type=float, default=3600.0)
        s.set_defaults(func=func)

    s = sub.add_parser("report", help="the /ui plots as one self-contained HTML file")
    s.add_argument("files", nargs="*", metavar="RESULT.json",
                   help="result files (run --output) or job files (status)")
    s.add_argument("--url", help="also the jobs of this service (ENTROPY_PROBE_API_TOKEN)")
    s.add_argument("--output", required=True, help="the HTML file to write")
    s.add_argument("--title", help="the page title")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("tiny-checkpoint", help="write a tiny real base+adapter+optimizer")
    s.add_argument("dir")
    s.add_argument("--vocab-size", type=int, default=None)
    s.add_argument("--hidden-size", type=int, default=32)
    s.add_argument("--layers", type=int, default=2)
    s.set_defaults(func=cmd_tiny)

    s = sub.add_parser("demo", help="tiny checkpoint → server → job → printed result")
    s.add_argument("--dir", default="demo-checkpoint")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:   # noqa: BLE001 - a CLI prints one line, not a stack trace
        from service.client import ProbeHTTPError
        if isinstance(exc, (ProbeHTTPError, OSError, ValueError)):
            print(f"entropy-probe {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
