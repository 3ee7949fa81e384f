"""The one Jinja2 environment of the app: templates from ROOT/templates, autoescaped.

Call `setup_templates(app)` once (handlers `setup_routes` does); a second call is a
no-op, so every page module can rely on it without setting up a second loader.
"""

from __future__ import annotations

import aiohttp_jinja2
import jinja2
from aiohttp import web

from server.config import ROOT

TEMPLATE_DIR = ROOT / "templates"


def setup_templates(app: web.Application) -> None:
    if aiohttp_jinja2.APP_KEY in app:
        return
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True, default=True),
    )
