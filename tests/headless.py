"""A real headless Chromium (Debian's `chromium`, driven by playwright without its own browser
download) that records every URL a page asks for and lets none leave the machine."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
# What this machine needs (the brief of issue 18): no sandbox as root, no GPU, nothing that
# phones home (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def chromium_path() -> str | None:
    return (os.environ.get("ENTROPY_PROBE_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.scheme in ("http", "https", "ws")
                                             and parts.hostname in LOCAL_HOSTS)


@dataclass
class Tab:
    """A page plus the URLs it requested (local ones served, others aborted and listed)."""

    page: object
    requested: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; skipped where none is installed, except in CI."""
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = ("no chromium on PATH (.ci/run installs Debian's with apt-get)" if path is None
               else "no playwright (the test extra)" if sync_playwright is None else None)
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    with sync_playwright() as p:
        # playwright adds --headless and a fresh temporary --user-data-dir itself
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def open_tab(browser, width: int = 1400, height: int = 1000) -> Tab:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    tab = Tab(page)

    def route(r):
        url = r.request.url
        tab.requested.append(url)
        if is_local(url):
            r.continue_()
        else:
            tab.blocked.append(url)
            r.abort()

    context.route("**/*", route)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    return tab


def wait_until(page, expression: str, timeout_s: float = 30.0) -> None:
    """Poll a JS expression until it is truthy. (playwright's wait_for_function evaluates its
    predicate with eval, which the pages' Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout_s:g} s: {expression}")
        page.wait_for_timeout(100)


def resource_urls(tab: Tab) -> list[str]:
    """What the page itself says it loaded (performance entries), next to the route log."""
    return tab.page.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name)"
        ".concat([location.href])")
