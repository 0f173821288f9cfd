"""Shared fixtures: a tiny real checkpoint, real `entropy-probe serve` processes on 127.0.0.1
(free port, own state dir) that are always stopped, and the broken checkpoints and guarded server
of the reliability modules. The classes and functions behind them are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FIGURES, RELIABILITY_TOKEN, Server, figures_line, write_broken_checkpoints


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """(base_dir, adapter_dir) of a tiny real Llama + LoRA + AdamW state; its parent is the
    checkpoint root of the test servers."""
    from probe_core.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture
def start_server(tmp_path, tiny_checkpoint):
    """Factory: start_server(state_dir=None, token=None, **ENV) → a ready Server."""
    servers: list[Server] = []
    roots = os.path.dirname(tiny_checkpoint[0])

    def start(state_dir: Path | None = None, token: str | None = None, wait: bool = True,
              **env: str) -> Server:
        server = Server(tmp_path, state_dir or tmp_path / "state", roots, token, **env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, tiny_checkpoint, request):
    """A server shared by a test module; options from the module's SERVER_ENV dict."""
    tmp = tmp_path_factory.mktemp("server")
    env = dict(getattr(request.module, "SERVER_ENV", {}))
    token = env.pop("api_token", None)
    server = Server(tmp, tmp / "state", os.path.dirname(tiny_checkpoint[0]), token, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- the reliability modules ------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_figures(request):
    """Counts the module's requests, faults and jobs (helpers.FIGURES) and prints them at its
    end, even without -s."""
    FIGURES.clear()
    yield
    line = figures_line(request.module.__name__, request.session.testsfailed)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n" + line)
        return
    with capture.global_and_fixture_disabled():
        print("\n" + line)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """Checkpoints that fail in every way a user can cause (helpers.write_broken_checkpoints)."""
    return write_broken_checkpoints(tmp_path_factory.mktemp("broken"),
                                    tmp_path_factory.mktemp("outside"), tiny_checkpoint)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, broken):
    """The guarded server of the reliability modules: token, OOM fault hook in teacher forcing,
    a LoRA guard between the adapter's and the full model's parameter counts, a 100 kB body
    limit; roots: the tiny checkpoint and the broken ones."""
    tmp = tmp_path_factory.mktemp("reliability-server")
    roots = os.pathsep.join([os.path.dirname(tiny_checkpoint[0]), str(broken["root"])])
    srv = Server(tmp, tmp / "state", roots, RELIABILITY_TOKEN, fault_hook="oom:teacher_forcing",
                 max_trainable_params=str(broken["limit"]), max_body_bytes="100000")
    srv.private = [str(broken["outside"])]
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
