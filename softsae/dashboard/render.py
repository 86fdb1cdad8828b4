"""The dashboard page: one self-contained ``index.html`` (inline CSS, JavaScript and data).

The page needs no server and no network: the data is a JSON document inside a
``<script type="application/json">`` element, drawn by the project's own script
(``assets/dashboard.js``, plain DOM and SVG, no library) with the styles of ``assets/dashboard.css``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from softsae.fileio import atomic_write_text

ASSETS = Path(__file__).resolve().parent / "assets"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; \
style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<header><h1>{title}</h1><div class="meta" id="meta"></div></header>
<nav><a href="#summary">Summary</a><a href="#view">Explanation length</a><a href="#latents">Latents</a></nav>
<div id="error-box"></div>
<main>
<section id="summary"><h2>Summary</h2><div class="row" id="summary-body"></div></section>
<section id="view"><h2>Explanation length, token by token</h2>
<div class="note" id="view-note"></div>
<div class="view-grid" id="view-grid"></div></section>
<section id="latents"><h2>Latents</h2>
<div class="note" id="cards-note"></div>
<div class="controls">
<label>ids <input id="filter" size="18" placeholder="e.g. 12, 40"></label>
<label>sort <select id="sort"><option value="count">firing frequency</option>\
<option value="max">max activation</option>\
<option value="id">id</option><option value="given">as given</option></select></label>
<label>per page <select id="page-size"><option>12</option><option selected>24</option><option>48</option>\
<option>96</option></select></label>
<span class="pager"><button class="prev">&larr; prev</button><span class="page-info"></span>\
<button class="next">next &rarr;</button></span>
</div>
<div id="cards"></div>
<div class="pager"><button class="prev">&larr; prev</button><span class="page-info"></span>\
<button class="next">next &rarr;</button></div>
</section>
</main>
<script>
window.addEventListener("error", function (e) {{
  var b = document.getElementById("error-box");
  b.style.display = "block";
  b.textContent = "The page failed to render: " + e.message;
}});
</script>
<script id="dashboard-data" type="application/json">{data}</script>
<script>
{js}
</script>
</body>
</html>
"""


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its <script> element early (``<``, ``>`` and ``&`` escaped)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any], title: str = "softsae dashboard") -> str:
    """The page for ``data`` (``Collector.finish()``'s dict plus ``meta``) as one HTML string."""
    for key in ("summary", "latents", "view", "tokens", "meta"):
        if key not in data:
            raise ValueError(f"dashboard data has no {key!r}")
    css = (ASSETS / "dashboard.css").read_text(encoding="utf-8")
    js = (ASSETS / "dashboard.js").read_text(encoding="utf-8")
    return _PAGE.format(title=html.escape(title), css=css, js=js, data=_json_for_script(data))


def write_dashboard(data: dict[str, Any], out_dir: str | Path, title: str = "softsae dashboard") -> Path:
    """Write ``out_dir/index.html`` (atomically; the folder is created) and ``out_dir/data.json``; returns
    the page's path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    page = out / "index.html"
    atomic_write_text(out / "data.json", json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(page, render_html(data, title))
    return page
