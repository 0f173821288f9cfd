"""The dashboard page: linked to the service's assets (/ui) or with everything inlined (report).

Nothing comes from outside: plotly.js is the copy the installed `plotly` package ships, so the
page works on an air-gapped host.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import plotly

from schemas.dashboard import Dashboard

STATIC = Path(__file__).with_name("static")
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# name → (file, media type): what GET /ui/assets/{name} serves
ASSETS = {"plotly.min.js": (PLOTLY_JS, "text/javascript"),
          "dashboard.js": (STATIC / "dashboard.js", "text/javascript"),
          "dashboard.css": (STATIC / "dashboard.css", "text/css")}


# Content-Security-Policy of the service's pages: a browser fetches nothing from elsewhere, even
# where a bundled script would (ReDoc's footer logo is an image on a CDN).
_LOCAL = ("default-src 'self'; img-src 'self' data: blob:; font-src 'self' data:; "
          "connect-src 'self'; worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; ")
UI_CSP = _LOCAL + "script-src 'self'"
DOCS_CSP = _LOCAL + "script-src 'self' 'unsafe-inline'"    # FastAPI's pages start inline


def _script_json(data) -> str:
    """JSON that can sit inside <script>: no '<' to close the tag early."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def _fill(title: str, style: str, scripts: str, config: dict) -> str:
    values = {"STYLE": style, "SCRIPTS": scripts, "CONFIG": _script_json(config),
              "TITLE": html.escape(title)}
    page = (STATIC / "page.html").read_text(encoding="utf-8")
    return re.sub(r"@(STYLE|SCRIPTS|CONFIG|TITLE)@", lambda m: values[m.group(1)], page)


@lru_cache(maxsize=1)
def ui_page() -> str:
    """The /ui page: its data comes from ui/data (relative, so a path prefix still works)."""
    return _fill("entropy-probe", '<link rel="stylesheet" href="ui/assets/dashboard.css">',
                 '<script src="ui/assets/plotly.min.js"></script>\n'
                 '<script src="ui/assets/dashboard.js"></script>',
                 {"mode": "live", "data_url": "ui/data"})


def _inline_script(path: Path) -> str:
    code = path.read_text(encoding="utf-8")
    if "</script" in code.lower():
        raise ValueError(f"{path} cannot be inlined: it contains '</script'")
    return f"<script>{code}</script>"


def report_page(dashboard: Dashboard) -> str:
    """One self-contained HTML file: styles, plotly.js, the drawing code and the data."""
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    style = "<style>" + (STATIC / "dashboard.css").read_text(encoding="utf-8") + "</style>"
    scripts = _inline_script(PLOTLY_JS) + "\n" + _inline_script(STATIC / "dashboard.js")
    return _fill(dashboard.title, style, scripts,
                 {"mode": "static", "written": written,
                  "dashboard": dashboard.model_dump(mode="json")})
