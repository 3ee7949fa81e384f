"""The `tencent` KMS provider: Tencent Cloud KMS (API 2019-01-18) through
tencentcloud-sdk-python-kms, whose blocking client runs on a bounded thread pool; every
call is bounded by KMS_TIMEOUT.

GenerateDataKey (AES_256) gives a data key and its CiphertextBlob (what we store);
Decrypt unwraps it; Encrypt / Decrypt serve the `kms:` secrets. Tencent keeps the
key material's versions inside the blob, so our KEK version is `tencent:<KeyId>`:
rotation re-wraps the rows of another KeyId (or of the local ring) under this one.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from server.config import PiiSettings
from server.pii.kms import DataKey, KmsError

T = TypeVar("T")


class TencentKms:
    name = "tencent"

    def __init__(self, pii: PiiSettings) -> None:
        from tencentcloud.common import credential
        from tencentcloud.common.profile.client_profile import ClientProfile
        from tencentcloud.common.profile.http_profile import HttpProfile
        from tencentcloud.kms.v20190118 import kms_client

        if not (pii.key_id and pii.secret_id and pii.secret_key):
            raise KmsError("KMS_PROVIDER=tencent needs KMS_KEY_ID, KMS_SECRET_ID and KMS_SECRET_KEY")
        endpoint = urlsplit(pii.endpoint)
        http = HttpProfile(
            endpoint=endpoint.netloc or endpoint.path,
            protocol=endpoint.scheme or "https",
            reqTimeout=max(1, int(pii.timeout)),
        )
        cred = credential.Credential(pii.secret_id, pii.secret_key.get_secret_value())
        self.key_id = pii.key_id
        self.version = f"tencent:{pii.key_id}"
        self.timeout = pii.timeout
        self.client = kms_client.KmsClient(cred, pii.region, ClientProfile(httpProfile=http))
        self.executor = ThreadPoolExecutor(pii.threads, thread_name_prefix="tencent-kms")

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.executor, fn), self.timeout)
        except TimeoutError:
            raise KmsError(f"Tencent KMS {what} took longer than {self.timeout} s") from None
        except TencentCloudSDKException as exc:
            raise KmsError(f"Tencent KMS {what} failed: {exc.get_code()}") from None

    def _request(self, name: str, **fields: Any) -> Any:
        from tencentcloud.kms.v20190118 import models

        req = getattr(models, name)()
        for key, value in fields.items():
            setattr(req, key, value)
        return req

    async def current_version(self) -> str:
        return self.version

    async def generate_data_key(self) -> DataKey:
        req = self._request("GenerateDataKeyRequest", KeyId=self.key_id, KeySpec="AES_256")
        resp = await self._call("GenerateDataKey", lambda: self.client.GenerateDataKey(req))
        key = base64.b64decode(resp.Plaintext)
        if len(key) != 32:
            raise KmsError("Tencent KMS GenerateDataKey answered a key that is not 256 bits")
        return DataKey(key, str(resp.CiphertextBlob).encode(), self.version)

    async def _decrypt(self, blob: str) -> bytes:
        req = self._request("DecryptRequest", CiphertextBlob=blob)
        resp = await self._call("Decrypt", lambda: self.client.Decrypt(req))
        return base64.b64decode(resp.Plaintext)

    async def _encrypt(self, plaintext: bytes) -> str:
        req = self._request(
            "EncryptRequest", KeyId=self.key_id, Plaintext=base64.b64encode(plaintext).decode()
        )
        resp = await self._call("Encrypt", lambda: self.client.Encrypt(req))
        return str(resp.CiphertextBlob)

    async def unwrap(self, wrapped: bytes, version: str) -> bytes:
        if not version.startswith("tencent:"):
            raise KmsError(f"KEK version {version!r} is not one of Tencent KMS")
        return await self._decrypt(wrapped.decode())

    async def rewrap(self, wrapped: bytes, version: str) -> tuple[bytes, str]:
        if version == self.version:
            return wrapped, version
        key = await self.unwrap(wrapped, version)
        return (await self._encrypt(key)).encode(), self.version

    async def encrypt_secret(self, plaintext: str) -> str:
        return await self._encrypt(plaintext.encode())

    async def decrypt_secret(self, ciphertext: str) -> str:
        return (await self._decrypt(ciphertext)).decode()

    async def retired_versions(self) -> set[str]:
        return set()

    def blind_index_key(self) -> bytes | None:
        return None

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
