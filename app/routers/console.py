"""/ui: the web console, static files from app/console/static (no data in them; every byte of data comes
from the admin API, called by the browser with the admin key the user types in)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.errors import ApiError

STATIC = (Path(__file__).resolve().parents[1] / "console" / "static").resolve()
# the page runs only its own scripts and talks only to this gateway
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}

router = APIRouter(tags=["console"], include_in_schema=False)


def static_file(rel: str) -> Path:
    """The console file at `rel`, refusing anything outside the static directory (404)."""
    path = (STATIC / rel).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise ApiError(404, f"no console file {rel!r}", code="not_found")
    return path


@router.get("/ui")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def console_index() -> FileResponse:
    return FileResponse(static_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{rel:path}")
async def console_file(rel: str) -> FileResponse:
    path = static_file(rel)
    media = "text/javascript; charset=utf-8" if path.suffix in (".js", ".mjs") else None
    return FileResponse(path, media_type=media, headers=HEADERS)
