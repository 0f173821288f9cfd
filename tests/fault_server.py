"""Test-only server: `python -m fault_server --fault oom:gradients --port N` serves like
`entropy-probe serve`, with workers that inject the fault (tests/faults.py) into jobs whose seed
is 424242. conftest's Server starts it when a test asks for a fault_hook."""

from __future__ import annotations

import argparse
import functools

import uvicorn

from faults import worker_main
from service.app import create_app
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    app = create_app(Settings(), worker_main=functools.partial(worker_main, args.fault))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
