"""Files of the local storage backend, behind signed, expiring URLs (docs/storage.md).

`GET /files/{key}?exp=<unix>&sig=<hex>` is public: the signature is the authorisation.
A link that is malformed, tampered with or expired answers 403 FORBIDDEN whether or not
the object exists, so a link reveals nothing about keys it was not made for. Only a
correctly signed, unexpired link to an object that is gone answers 404 NOT_FOUND.
With STORAGE_BACKEND=cos the URLs point at COS and this route answers 404.
"""

from __future__ import annotations

from aiohttp import web

from server.errors import ErrorCode
from server.keys import media_key
from server.routing import RouteTable

routes = RouteTable(tags=["files"], auth="public")


@routes.get(
    "/files/{key:.+}",
    content_type="application/octet-stream",
    errors=[ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND],
    summary="A stored file, through a signed URL from an API answer",
)
async def get_file(request: web.Request) -> web.StreamResponse:
    """The bytes of a stored object with its own Content-Type.

    The `url` fields of the API are links to this route; they carry `exp` (unix time)
    and `sig` (HMAC-SHA256) and stop working at `exp`.
    """
    query = request.query
    file = await request.app[media_key].local_file(
        request.match_info["key"], query.get("exp", ""), query.get("sig", "")
    )
    headers = {
        "Content-Type": file.content_type,
        "Cache-Control": f"private, max-age={file.remaining}",
        "X-Content-Type-Options": "nosniff",
    }
    return web.FileResponse(file.path, headers=headers)
