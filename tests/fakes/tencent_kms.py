"""An in-process fake of Tencent Cloud KMS (API version 2019-01-18): GenerateDataKey,
Encrypt and Decrypt.

It checks the TC3-HMAC-SHA256 signature as the real API does (the same scheme as
tests/fakes/tencent_sms.py, with the service `kms`): canonical request, string to sign
over `<date>/kms/tc3_request`, the derived signing key, a timestamp within 5 minutes.
Failures answer HTTP 200 with {"Response": {"Error": {Code, Message}, "RequestId"}}.

Each KeyId has its own master key (made on first use); a CiphertextBlob is base64 of
KeyId + nonce + AES-GCM ciphertext with the KeyId as associated data, so a blob of
another key (or a tampered one) fails with InvalidParameter as Tencent's does.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.fakes.tc3 import answer, check_tc3

SERVICE = "kms"
VERSION = "2019-01-18"


@dataclass
class FakeTencentKms:
    secret_id: str
    secret_key: str
    keys: dict[str, bytes] = field(default_factory=dict)  # KeyId → master key
    calls: list[str] = field(default_factory=list)  # actions served
    rejected: list[str] = field(default_factory=list)  # error codes answered
    hold: float = 0.0  # seconds each answer waits (timeouts)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        return app

    def error(self, code: str, message: str) -> web.Response:
        self.rejected.append(code)
        return answer({"Error": {"Code": code, "Message": message}, "RequestId": uuid.uuid4().hex})

    def _master(self, key_id: str) -> bytes:
        return self.keys.setdefault(key_id, AESGCM.generate_key(bit_length=256))

    def _wrap(self, key_id: str, plaintext: bytes) -> str:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self._master(key_id)).encrypt(nonce, plaintext, key_id.encode())
        return base64.b64encode(key_id.encode() + b"|" + nonce + ct).decode()

    def _unwrap(self, blob: str) -> tuple[str, bytes] | None:
        try:
            raw = base64.b64decode(blob, validate=True)
            key_id, _, rest = raw.partition(b"|")
            master = self.keys.get(key_id.decode())
            if master is None:
                return None
            return key_id.decode(), AESGCM(master).decrypt(rest[:12], rest[12:], key_id)
        except (ValueError, InvalidTag):
            return None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = self.check_signature(request, body)
        if problem is not None:
            return self.error(*problem)
        action = request.headers.get("X-TC-Action", "")
        if request.headers.get("X-TC-Version") != VERSION:
            return self.error("InvalidAction", "unknown version")
        if self.hold:
            import asyncio

            await asyncio.sleep(self.hold)
        params = json.loads(body)
        self.calls.append(action)
        rid = uuid.uuid4().hex
        if action == "GenerateDataKey":
            if params.get("KeySpec") != "AES_256" or not params.get("KeyId"):
                return self.error("InvalidParameter", "KeyId and KeySpec AES_256 are required")
            key = secrets.token_bytes(32)
            return answer(
                {
                    "KeyId": params["KeyId"],
                    "Plaintext": base64.b64encode(key).decode(),
                    "CiphertextBlob": self._wrap(params["KeyId"], key),
                    "RequestId": rid,
                }
            )
        if action == "Encrypt":
            try:
                plaintext = base64.b64decode(params.get("Plaintext", ""), validate=True)
            except ValueError:
                return self.error("InvalidParameter", "Plaintext is not base64")
            return answer(
                {
                    "KeyId": params["KeyId"],
                    "CiphertextBlob": self._wrap(params["KeyId"], plaintext),
                    "RequestId": rid,
                }
            )
        if action == "Decrypt":
            opened = self._unwrap(params.get("CiphertextBlob", ""))
            if opened is None:
                return self.error(
                    "InvalidParameterValue.InvalidCiphertext", "the ciphertext does not decrypt"
                )
            key_id, plaintext = opened
            return answer(
                {"KeyId": key_id, "Plaintext": base64.b64encode(plaintext).decode(), "RequestId": rid}
            )
        return self.error("InvalidAction", f"unknown action {action!r}")

    def check_signature(self, request: web.Request, body: bytes) -> tuple[str, str] | None:
        return check_tc3(request, body, self.secret_id, self.secret_key, SERVICE)
