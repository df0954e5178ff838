"""The labelling server: the page (static files shipped in dpokit/assets/label) and three JSON endpoints.

Starlette + uvicorn: a standard ASGI stack that is small (two pure-Python packages) and enough for a handful of
JSON routes; FastAPI would add pydantic request models and OpenAPI pages that nobody here needs. Both are the
optional extra `dpokit[label]`, so this module is imported only by `dpokit label serve`.

Security: the page and its scripts are the same for everyone, so they are public; the data goes only through
/api/*, which needs the token when one is set (required off 127.0.0.1). Request bodies are capped at
MAX_BODY bytes. On 127.0.0.1 without a token the Host header must name this machine, so another web site cannot
reach the server through DNS rebinding. The Content-Security-Policy allows only this server's own script and
style, so even a mistake in the page could not run model text as code (the page writes it with textContent).
A vision item's images travel inside /api/next's answer as data URIs, made from the files the source named (the
item's own image list): there is no route that reads a file by name, so no path can be smuggled in.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dpokit.core.io import image_data_uri
from dpokit.label.store import SIDES, Conflict, LabelStore

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "label"
MAX_BODY = 64 * 1024  # an answer with a reason is well under 1 KB
MAX_REASON = 2000
MAX_NAME = 64
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Cache-Control": "no-store",
}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_json(request: Request) -> dict:
    """The request's JSON object, read up to MAX_BODY bytes (a longer body is refused, not read)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def annotator_name(data: dict) -> str:
    name = data.get("annotator")
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_NAME \
            or any(not ch.isprintable() for ch in name):
        raise BadRequest(f"'annotator' must be a name of 1 to {MAX_NAME} printable characters")
    return name.strip()


IMAGE_PX = 512  # the longer side of a prompt's picture on the page


def picture(path: str) -> dict:
    """One of an item's images for the page: {src: a data URI, alt}, or {missing: why} when the file went away
    since the DB was made. Only the files the source named reach here (the item's own `images`): the page never
    names a path, so nothing else on disk can be read through the server."""
    name = Path(path).name
    try:
        return {"src": image_data_uri(path, IMAGE_PX), "alt": f"prompt image {name}"}
    except (OSError, ValueError) as err:
        return {"missing": f"image {name} cannot be read now ({type(err).__name__})", "alt": f"prompt image {name}"}


def build_app(store: LabelStore, *, token: str | None = None, local_only: bool = True) -> Starlette:
    """The ASGI app over an open store. `local_only`: accept only Host headers naming this machine."""

    def payload(annotator: str, shown=None) -> dict:
        item = None if shown is None else {"id": shown.item, "prompt": shown.prompt, "left": shown.left,
                                           "right": shown.right, "images": [picture(p) for p in shown.images]}
        return {"item": item, "progress": store.progress(annotator)}

    async def index(request: Request):
        return FileResponse(ASSETS / "index.html")

    async def api(request: Request):
        if token is not None:
            given = request.headers.get("x-label-token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong token; open the URL printed by dpokit label serve"},
                                    401)
        try:
            data = await read_json(request)
            annotator = annotator_name(data)
            action = request.path_params["action"]
            if action not in ("next", "answer", "undo"):
                raise BadRequest(f"no endpoint /api/{action}; there are next, answer and undo", 404)
            if action == "next":
                return JSONResponse(payload(annotator, store.next_item(annotator)))
            if action == "undo":
                undone = store.undo(annotator)
                return JSONResponse({"undone": undone, **payload(annotator, store.next_item(annotator))})
            item, side, reason = data.get("item"), data.get("choice"), data.get("reason", "")
            if not isinstance(item, int) or isinstance(item, bool):
                raise BadRequest("'item' must be an item id")
            if side not in SIDES:
                raise BadRequest(f"'choice' must be one of {sorted(SIDES)}")
            if not isinstance(reason, str) or len(reason) > MAX_REASON:
                raise BadRequest(f"'reason' must be text of at most {MAX_REASON} characters")
            try:
                store.answer(annotator, item, side, reason.strip())
            except Conflict as err:
                raise BadRequest(str(err), 409) from None
            # Committed: only now does the page hear "saved" and move on.
            return JSONResponse({"saved": item, **payload(annotator, store.next_item(annotator))})
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, err.status)

    middleware = [Middleware(BaseHTTPMiddleware, dispatch=_security_headers)]
    if local_only and token is None:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]))
    routes = [
        Route("/", index),
        Route("/api/{action:str}", api, methods=["POST"]),
        Mount("/static", StaticFiles(directory=ASSETS), name="static"),
    ]
    return Starlette(routes=routes, middleware=middleware)


async def _security_headers(request: Request, call_next):
    response = await call_next(request)
    for key, value in HEADERS.items():
        response.headers.setdefault(key, value)
    return response
