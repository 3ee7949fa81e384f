"""An in-process fake of Tencent Cloud COS: one bucket, objects in memory.

It speaks the part of the XML API our storage uses (PUT/GET/HEAD/DELETE object,
POST /?delete, GET Bucket listing with prefix/marker/max-keys/encoding-type, GET/PUT/
DELETE /?lifecycle) and
checks every request's `q-sign-algorithm=sha1` signature, from the
Authorization header or from a presigned URL's query, the way COS does:

    SignKey      = HMAC-SHA1(SecretKey, q-key-time)
    HttpString   = method\\nuri-path\\nparams\\nheaders\\n
    StringToSign = sha1\\nq-sign-time\\nSHA1(HttpString)\\n
    Signature    = HMAC-SHA1(SignKey, StringToSign)

`params`/`headers` are the names listed in q-url-param-list/q-header-list, lower-cased,
with URL-encoded values, sorted, joined as k=v&k=v. One deliberate difference: the SDK
signs the URL's hostname without its port, so `host` is compared without the port
(real COS is reached on the default port, where the two agree).

Knobs for tests and benchmarks: `latency` (seconds every authorised request waits
before it is answered), `fail_deletes` (key → how many more multi-deletes answer an
`<Error>` entry for it: a partial failure), `hold`/`held` (park requests), and
`hold_after_write` (a held PUT stores the object first, then waits).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

_SIGN_FIELDS = ("q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list",
                "q-url-param-list", "q-signature")  # fmt: skip


def _enc(value: str) -> str:
    return quote(value, safe="-_.~")


@dataclass
class FakeCos:
    secret_id: str
    secret_key: str
    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    modified: dict[str, float] = field(default_factory=dict)  # key → unix time of its PUT
    calls: list[str] = field(default_factory=list)  # "METHOD /path" of every authorised request
    now: Callable[[], float] = time.time
    # When `hold` is set to an Event, authorised requests set `held` and wait for `hold`.
    hold: asyncio.Event | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)
    hold_after_write: bool = False  # with `hold`: a PUT stores its object, then waits
    latency: float = 0.0  # seconds each authorised request waits before it is answered
    fail_deletes: dict[str, int] = field(default_factory=dict)  # key → multi-deletes still to fail
    lifecycle: list[dict[str, str]] | None = None  # rules as {"ID", "Prefix", "Status", "Days"}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{key:.*}", self.handle)
        return app

    def error(self, request: web.Request, status: int, code: str, message: str) -> web.Response:
        rid = uuid.uuid4().hex
        body = (
            "<?xml version='1.0' encoding='utf-8' ?>\n<Error>"
            f"<Code>{code}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(request.host + request.path)}</Resource>"
            f"<RequestId>{rid}</RequestId><TraceId>{rid}</TraceId></Error>"
        )
        text = None if request.method == "HEAD" else body
        return web.Response(status=status, text=text, content_type="application/xml",
                            headers={"x-cos-request-id": rid})  # fmt: skip

    def check_signature(self, request: web.Request) -> str | None:
        """None when the request is signed correctly, else the COS error code."""
        header = request.headers.get("Authorization", "")
        pairs = [p.split("=", 1) for p in header.split("&") if "=" in p]
        auth = {k: v for k, v in pairs} if header else {k: request.query.get(k, "") for k in _SIGN_FIELDS}
        if auth.get("q-sign-algorithm") != "sha1" or not auth.get("q-signature"):
            return "AccessDenied"
        if auth.get("q-ak") != self.secret_id:
            return "InvalidAccessKeyId"
        try:
            start, end = (int(t) for t in auth["q-sign-time"].split(";"))
        except ValueError:
            return "AccessDenied"
        if not start <= self.now() <= end:
            return "RequestTimeTooSkewed"
        query = {_enc(k).lower(): _enc(v) for k, v in request.query.items() if k not in _SIGN_FIELDS}
        headers = {}
        for name in filter(None, auth.get("q-header-list", "").split(";")):
            value = request.host.rsplit(":", 1)[0] if name == "host" else request.headers.get(name)
            if value is None:
                return "SignatureDoesNotMatch"
            headers[name] = _enc(value)
        names = sorted(filter(None, auth.get("q-url-param-list", "").split(";")))
        if any(n not in query for n in names):
            return "SignatureDoesNotMatch"
        http_string = "\n".join([
            request.method.lower(),
            request.path,
            "&".join(f"{n}={query[n]}" for n in names),
            "&".join(f"{n}={headers[n]}" for n in sorted(headers)),
            "",
        ])  # fmt: skip
        digest = hashlib.sha1(http_string.encode()).hexdigest()
        string_to_sign = f"sha1\n{auth['q-sign-time']}\n{digest}\n"
        sign_key = hmac.new(self.secret_key.encode(), auth["q-key-time"].encode(), hashlib.sha1).hexdigest()
        expected = hmac.new(sign_key.encode(), string_to_sign.encode(), hashlib.sha1).hexdigest()
        return None if hmac.compare_digest(expected, auth["q-signature"]) else "SignatureDoesNotMatch"

    async def handle(self, request: web.Request) -> web.Response:
        refused = self.check_signature(request)
        if refused is not None:
            return self.error(request, 403, refused, f"The request signature was refused: {refused}")
        self.calls.append(f"{request.method} {request.path}")
        if self.latency:
            await asyncio.sleep(self.latency)
        key = request.match_info["key"]
        body = await request.read()
        if self.hold is not None and not (self.hold_after_write and request.method == "PUT"):
            self.held.set()
            await self.hold.wait()
        if "Content-MD5" in request.headers:
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            if md5 != request.headers["Content-MD5"]:
                return self.error(request, 400, "InvalidDigest", "The Content-MD5 you specified is invalid")
        if request.method == "POST" and not key and "delete" in request.query:
            return self.multi_delete(body)
        if not key and "lifecycle" in request.query:
            return self.bucket_lifecycle(request, body)
        if request.method == "GET" and not key:
            return self.list_objects(request)
        if not key:
            return self.error(request, 405, "MethodNotAllowed", "Only object operations are faked")
        if request.method == "PUT":
            self.objects[key] = (body, request.headers.get("Content-Type", "application/octet-stream"))
            self.modified[key] = self.now()
            if self.hold is not None and self.hold_after_write:
                self.held.set()
                await self.hold.wait()
            return web.Response(headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if request.method == "DELETE":
            self.objects.pop(key, None)
            self.modified.pop(key, None)
            return web.Response(status=204)
        if request.method in ("GET", "HEAD"):
            if key not in self.objects:
                return self.error(request, 404, "NoSuchKey", "The specified key does not exist.")
            data, ctype = self.objects[key]
            return web.Response(body=data, headers={"Content-Type": ctype})
        return self.error(request, 405, "MethodNotAllowed", f"{request.method} is not faked")

    def multi_delete(self, body: bytes) -> web.Response:
        root = ET.fromstring(body)
        quiet = (root.findtext("Quiet") or "false").lower() == "true"
        objects = list(root.iter("Object"))
        if not 1 <= len(objects) <= 1000:
            return web.Response(status=400, text="<Error><Code>MalformedXML</Code></Error>")
        deleted, errors = [], []
        for obj in objects:
            key = obj.findtext("Key") or ""
            if self.fail_deletes.get(key, 0) > 0:
                self.fail_deletes[key] -= 1
                errors.append(
                    f"<Error><Key>{escape(key)}</Key><Code>InternalError</Code>"
                    "<Message>We encountered an internal error.</Message></Error>"
                )
                continue
            self.objects.pop(key, None)
            self.modified.pop(key, None)
            deleted.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        inner = ("" if quiet else "".join(deleted)) + "".join(errors)
        return web.Response(text=f"<DeleteResult>{inner}</DeleteResult>", content_type="application/xml")

    def list_objects(self, request: web.Request) -> web.Response:
        """GET Bucket: keys in byte order after `marker`, at most `max-keys` (≤ 1000)."""
        prefix, marker = request.query.get("prefix", ""), request.query.get("marker", "")
        try:
            max_keys = int(request.query.get("max-keys", "1000"))
        except ValueError:
            return self.error(request, 400, "InvalidArgument", "max-keys must be an integer")
        if not 0 <= max_keys <= 1000:
            return self.error(request, 400, "InvalidArgument", "max-keys must be 0..1000")
        url_encoded = request.query.get("encoding-type") == "url"
        encode = (lambda k: quote(k, safe="/")) if url_encoded else str
        keys = sorted(k for k in self.objects if k.startswith(prefix) and k.encode() > marker.encode())
        page, truncated = keys[:max_keys], len(keys) > max_keys
        contents = "".join(
            f"<Contents><Key>{escape(encode(k))}</Key>"
            f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(self.modified.get(k, 0)))}"
            f'</LastModified><ETag>"{hashlib.md5(self.objects[k][0]).hexdigest()}"</ETag>'
            f"<Size>{len(self.objects[k][0])}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for k in page
        )
        following = f"<NextMarker>{escape(encode(page[-1]))}</NextMarker>" if truncated and page else ""
        body = (
            "<?xml version='1.0' encoding='utf-8' ?>\n<ListBucketResult>"
            f"<Name>{escape(request.host.split('.')[0])}</Name>"
            f"{'<EncodingType>url</EncodingType>' if url_encoded else ''}"
            f"<Prefix>{escape(encode(prefix))}</Prefix><Marker>{escape(encode(marker))}</Marker>"
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(truncated).lower()}</IsTruncated>"
            f"{following}{contents}</ListBucketResult>"
        )
        return web.Response(text=body, content_type="application/xml")

    def bucket_lifecycle(self, request: web.Request, body: bytes) -> web.Response:
        """PUT/GET/DELETE Bucket lifecycle: rules with a prefix filter and an expiration in days."""
        if request.method == "DELETE":
            self.lifecycle = None
            return web.Response(status=204)
        if request.method == "PUT":
            if "Content-MD5" not in request.headers:
                return self.error(request, 400, "MissingContentMD5", "PUT Bucket lifecycle needs Content-MD5")
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                return self.error(request, 400, "MalformedXML", "The XML you provided was not well-formed")
            rules = []
            for rule in root.iter("Rule"):
                days = rule.findtext("Expiration/Days")
                status = rule.findtext("Status")
                if (
                    status not in ("Enabled", "Disabled")
                    or days is None
                    or not days.isdigit()
                    or int(days) < 1
                ):
                    return self.error(
                        request, 400, "MalformedXML", "Each rule needs a Status and Expiration/Days >= 1"
                    )
                prefix = rule.findtext("Filter/Prefix") or rule.findtext("Prefix") or ""
                rules.append(
                    {"ID": rule.findtext("ID") or "", "Prefix": prefix, "Status": status, "Days": days}
                )
            if not rules:
                return self.error(request, 400, "MalformedXML", "A lifecycle configuration needs a rule")
            self.lifecycle = rules
            return web.Response()
        if request.method == "GET":
            if self.lifecycle is None:
                return self.error(
                    request,
                    404,
                    "NoSuchLifecycleConfiguration",
                    "The lifecycle configuration does not exist.",
                )
            rules = "".join(
                f"<Rule><ID>{escape(r['ID'])}</ID><Filter><Prefix>{escape(r['Prefix'])}</Prefix></Filter>"
                f"<Status>{r['Status']}</Status><Expiration><Days>{r['Days']}</Days></Expiration></Rule>"
                for r in self.lifecycle
            )
            return web.Response(text=f"<LifecycleConfiguration>{rules}</LifecycleConfiguration>",
                                content_type="application/xml")  # fmt: skip
        return self.error(request, 405, "MethodNotAllowed", f"{request.method} ?lifecycle is not faked")
