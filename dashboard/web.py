"""The dashboard's routes on the worker's web server: the page at `/`, its script and style, and
the chart library.

The page reads only the public JSON views and the push feed (`/prices`, `/prices/{coin}`,
`/prices/{coin}/candles`, `/analytics`, `/health`, `/stream/prices`), so it shows what any
client of the API sees. The chart library is plotly.js as the `plotly` wheel ships it
(`plotly/package_data/plotly.min.js`): installed with the app, served from here, so the page
works offline and no third-party file lives in the repository. Its URL names the plotly version
and is cached for a year; the page and its own assets are revalidated on every load (ETag /
Last-Modified), so a new version shows up at once.

Faust always mounts a view of its own at `/` (its production index, or its statistics with
`web_stats_enabled`) when the web server starts. The page's route is a pattern that also matches
`/`, registered at import, earlier: aiohttp resolves routes in the order they were added, so the
page answers `/` and Faust's index is never reached.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from aiohttp import web
from faust.web import Request, View

from app.main import app

STATIC = Path(str(resources.files("dashboard") / "static"))
ASSETS = {"dashboard.js": STATIC / "dashboard.js", "dashboard.css": STATIC / "dashboard.css"}
PLOTLY = metadata.distribution("plotly")  # found without importing its (large) Python package
PLOTLY_JS = Path(str(PLOTLY.locate_file("plotly/package_data/plotly.min.js")))
PLOTLY_URL = f"/dashboard/plotly-{PLOTLY.version}.min.js"
REVALIDATE = {"Cache-Control": "no-cache"}
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
PAGE = (STATIC / "index.html").read_text().replace("{{PLOTLY_URL}}", PLOTLY_URL)


@app.page(r"/{page:(?:index\.html)?}")
class Page(View):
    """GET /: the dashboard."""

    async def get(self, request: Request, page: str) -> web.StreamResponse:
        return web.Response(text=PAGE, content_type="text/html", headers=REVALIDATE)


@app.page("/dashboard/{name}")
class Asset(View):
    """GET /dashboard/{name}: the page's script and style, and the chart library."""

    async def get(self, request: Request, name: str) -> web.StreamResponse:
        if f"/dashboard/{name}" == PLOTLY_URL:
            return web.FileResponse(PLOTLY_JS, headers=IMMUTABLE)
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(ASSETS[name], headers=REVALIDATE)
