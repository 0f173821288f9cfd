"""The `entropy-probe` command: serve, run, submit, status, report, tiny-checkpoint, demo.

The CLI keeps the server's rules: `run` reads the same settings (ENTROPY_PROBE_*), refuses what
the server would refuse, and a bad input (request file, setting, job id) is one line naming the
field with exit status 2, never a traceback. A probe or job that fails exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_HOST, DEFAULT_PORT = LOOPBACK_HOSTS[0], 8000
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_WAIT_S = 3600.0
EXIT_FAILED = 1          # the probe or job ran and failed, or the server refused the call
EXIT_BAD_INPUT = 2       # what the user gave (a file, a setting, an id) is wrong; as argparse


class BadInput(Exception):
    """A user input that the command refuses; the message names the file and field."""


def _fields(errors: list[dict]) -> str:
    """'loc: msg; loc: msg' for pydantic errors or a 422's detail (the leading "body" dropped)."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", [])]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts)


def load_settings():
    """Settings from the environment; a bad ENTROPY_PROBE_* value is BadInput naming it."""
    from pydantic import ValidationError

    from service.settings import Settings
    try:
        return Settings()
    except ValidationError as exc:
        names = [{**e, "loc": [f"ENTROPY_PROBE_{str(e['loc'][0]).upper()}", *e["loc"][1:]]}
                 for e in exc.errors()]
        raise BadInput(f"invalid setting: {_fields(names)}") from None


def read_request(path: str, settings=None):
    """The ProbeRequest in `path`, checked as the server checks a POST /probes body (schema,
    then paths against the checkpoint roots when `settings` is given). Raises BadInput."""
    from pydantic import ValidationError

    from schemas import ProbeRequest
    from service.admission import path_errors
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read the request file {path}: {exc.strerror}") from None
    try:
        req = ProbeRequest.model_validate_json(text)
    except ValidationError as exc:
        raise BadInput(f"invalid request in {path}: {_fields(exc.errors())}") from None
    if settings is not None and (errors := path_errors(req, settings.roots)):
        raise BadInput(f"invalid request in {path}: {_fields(errors)}")
    return req


def _client(args):
    from service.client import ProbeClient
    return ProbeClient(args.url, token=os.environ.get("ENTROPY_PROBE_API_TOKEN"))


def cmd_serve(args) -> int:
    import uvicorn

    from service.app import create_app
    settings = load_settings()
    if settings.api_token is None and args.host not in LOOPBACK_HOSTS:
        print(f"entropy-probe serve: listening on {args.host} without ENTROPY_PROBE_API_TOKEN: "
              "anyone who can reach the port can run jobs", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_run(args) -> int:
    """In-process probe, no server, under the server's settings and checks."""
    settings = load_settings()
    req = read_request(args.request, settings)      # refused before torch is even imported
    import time

    from probe_core.errors import ProbeError
    from probe_core.probe import ProbeHooks, run_probe
    from service.mapping import to_result, to_spec
    from service.settings import runtime_options
    from service.summary import progress_line, summarize
    from service.supervisor import Deadlines

    if req.workers > 1:
        print(f"entropy-probe run: workers={req.workers} is for a server's pool; this runs the "
              "whole job in one process", file=sys.stderr)
    seconds = Deadlines(settings.max_job_seconds).of(req.timeout_s)
    hooks = ProbeHooks(progress=progress_line,
                       deadline=None if seconds is None else time.monotonic() + seconds)
    try:
        spec = to_spec(req, host_budget_bytes=settings.host_budget_bytes)
        outcome = run_probe(spec, runtime_options(settings, device=args.device), hooks=hooks)
        result = to_result(outcome, spec.checkpoint)
    except ProbeError as exc:
        print(f"\nprobe failed [{exc.code}] in {exc.phase}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    print(file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            f.write(result.model_dump_json(indent=2))
    print(summarize(result))
    return 0


def cmd_submit(args) -> int:
    from service.client import ProbeFailed
    from service.summary import progress_line, summarize

    req = read_request(args.request)          # the server checks the paths against its roots
    with _client(args) as client:
        job_id = client.submit(req.model_dump(mode="json", exclude_unset=True))
        print(job_id)
        if not args.wait:
            return 0
        try:
            result = client.wait(job_id, timeout=args.timeout, on_progress=lambda p:
                                 progress_line(p.phase, p.done, p.total))
        except ProbeFailed as exc:
            print(f"\n{exc}", file=sys.stderr)
            return EXIT_FAILED
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
        raise BadInput("name result files (run --output), or --url of a service")
    try:
        n = write_report(args.files, args.output, url=args.url,
                         token=os.environ.get("ENTROPY_PROBE_API_TOKEN"), title=args.title)
    except (OSError, ValueError) as exc:       # an input file that is missing or not ours
        raise BadInput(str(exc)) from None
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
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise BadInput(f"--dir {args.dir} is a file: name a directory for the tiny checkpoint")
    return run_demo(args.dir)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (settings: ENTROPY_PROBE_* env)")
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="run one probe in this process (no server; the server's "
                       "ENTROPY_PROBE_* settings apply)")
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
            s.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S)
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
    s.add_argument("--vocab-size", type=_positive_int, default=None)
    s.add_argument("--hidden-size", type=_positive_int, default=32)
    s.add_argument("--layers", type=_positive_int, default=2)
    s.set_defaults(func=cmd_tiny)

    s = sub.add_parser("demo", help="tiny checkpoint → server → job → printed result")
    s.add_argument("--dir", default="demo-checkpoint")
    s.set_defaults(func=cmd_demo)
    return p


def _http_error(exc) -> tuple[str, int]:
    """The message and exit status for a call the server refused: a 422 (its fields) or a
    404 (the id) is bad input; anything else a failure."""
    if exc.status_code == 422 and isinstance(exc.detail, list):
        return f"the server refused the request (HTTP 422): {_fields(exc.detail)}", EXIT_BAD_INPUT
    return str(exc), EXIT_BAD_INPUT if exc.status_code == 404 else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import httpx

    from service.client import ProbeHTTPError
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BadInput as exc:
        print(f"entropy-probe {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ProbeHTTPError as exc:
        message, status = _http_error(exc)
        print(f"entropy-probe {args.command}: {message}", file=sys.stderr)
        return status
    except httpx.HTTPError as exc:
        print(f"entropy-probe {args.command}: cannot reach the server at {args.url}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:   # a server that cannot be reached, a full disk, ...
        print(f"entropy-probe {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
