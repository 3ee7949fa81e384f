"""Access tokens (HS256 JWTs with a `kid`) and opaque refresh tokens.

Key rotation: JWT_KEYS lists `kid:secret` pairs, newest first. The first signs;
every listed key verifies, so a new key is rolled out by putting it first and the
old one is dropped once the last token it signed has expired (15 minutes).

A kid is a label, never derived from its secret: anyone holding a token reads the
kid, and a hash of the secret there would let them test guessed secrets offline.

Refresh tokens are `<sid>.<secret>`: the session id in clear (to find the session)
and 256 random bits. Only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import jwt
from pydantic import SecretStr

from server.errors import AppError, ErrorCode

ALGORITHM = "HS256"
Role = Literal["user", "admin"]
VERIFIED_CACHE_SIZE = 10_000
_REQUIRED_CLAIMS = ["sub", "role", "sid", "typ", "iat", "exp", "jti"]
# The kid of the JWT_SECRET key (unique among configured keys is all a kid needs).
DEFAULT_KID = "default"


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    secret: str


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the access token says: no database behind it."""

    user_id: int
    role: Role
    sid: str
    perms: frozenset[str] = frozenset()  # the `perms` claim: an admin's permissions (issue 13)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class _JwtSettings(Protocol):
    """What signing needs of the auth settings (server/config.py AuthSettings). A protocol,
    so this module need not import the configuration that checks these keys with it."""

    @property
    def jwt_keys(self) -> SecretStr: ...
    @property
    def jwt_secret(self) -> SecretStr: ...
    @property
    def access_token_ttl(self) -> int: ...


class _Settings(Protocol):
    @property
    def auth(self) -> _JwtSettings: ...


def parse_jwt_keys(settings: _Settings) -> list[SigningKey]:
    """JWT_KEYS (`kid:secret,kid:secret`, newest first), or JWT_SECRET under the kid "default".

    With JWT_SECRET, the kid earlier releases derived from it (8 hex of its SHA-256) is
    kept as a second, verify-only entry, so access tokens issued before an upgrade
    live out their 15 minutes. It is never written into a new token. Remove it (and
    `_legacy_kid`) one release after this one."""
    raw = settings.auth.jwt_keys.get_secret_value().strip()
    if not raw:
        secret = settings.auth.jwt_secret.get_secret_value()
        return [SigningKey(DEFAULT_KID, secret), SigningKey(_legacy_kid(secret), secret)]
    keys: list[SigningKey] = []
    for item in raw.split(","):
        kid, sep, secret = item.strip().partition(":")
        if not sep or not kid or not secret:
            raise ValueError("JWT_KEYS must look like 'kid1:secret1,kid2:secret2'")
        if any(k.kid == kid for k in keys):
            raise ValueError(f"JWT_KEYS names the kid {kid!r} twice")
        keys.append(SigningKey(kid, secret))
    return keys


def _legacy_kid(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_id() -> str:
    return uuid.uuid4().hex


def new_refresh_token(sid: str) -> str:
    return f"{sid}.{secrets.token_urlsafe(32)}"


def session_id_of(refresh_token: str) -> str | None:
    """The session id a refresh token names, or None when it is not one of ours."""
    sid, sep, rest = refresh_token.partition(".")
    if not sep or len(sid) != 32 or len(rest) < 32 or any(c not in "0123456789abcdef" for c in sid):
        return None
    return sid


class TokenIssuer:
    def __init__(self, keys: list[SigningKey], access_ttl: int) -> None:
        if not keys:
            raise ValueError("at least one JWT key is needed")
        self.keys = keys
        self._by_kid = {k.kid: k.secret for k in keys}
        self.access_ttl = access_ttl
        self._verified: dict[str, tuple[Principal, int]] = {}

    @classmethod
    def from_settings(cls, settings: _Settings) -> TokenIssuer:
        return cls(parse_jwt_keys(settings), settings.auth.access_token_ttl)

    def issue_access(
        self, user_id: int, role: str, sid: str, *, now: float | None = None, perms: Iterable[str] = ()
    ) -> str:
        iat = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "role": role,
            "sid": sid,
            "typ": "access",
            "iat": iat,
            "exp": iat + self.access_ttl,
            "jti": uuid.uuid4().hex,
        }
        if role == "admin" and (granted := sorted(set(perms))):
            claims["perms"] = granted  # read back with no database query, like the role
        signer = self.keys[0]
        return jwt.encode(claims, signer.secret, algorithm=ALGORITHM, headers={"kid": signer.kid})

    def verify_access(self, token: str) -> Principal:
        """The caller of a valid access token; UNAUTHENTICATED or TOKEN_EXPIRED otherwise.

        A token that verified once is remembered (bounded, until its `exp`): the same
        string signed by the same key verifies the same way, and PyJWT's checks cost
        more than the rest of a cached profile read."""
        hit = self._verified.get(token)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp:
                return principal
            del self._verified[token]
        principal, exp = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, int]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _bad("The access token is malformed") from None
        # alg is checked by jwt.decode too (only HS256 is accepted); failing early
        # keeps `none` and public-key algorithms away from key lookup altogether.
        if header.get("alg") != ALGORITHM:
            raise _bad("The access token is not signed with HS256")
        secret = self._by_kid.get(str(header.get("kid", "")))
        if secret is None:
            raise _bad("The access token is signed by an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise AppError(ErrorCode.TOKEN_EXPIRED, "The access token has expired; refresh it") from None
        except jwt.PyJWTError:
            raise _bad("The access token is invalid") from None
        if claims.get("typ") != "access":
            raise _bad("This is not an access token")
        role, sub, sid = claims.get("role"), claims.get("sub"), claims.get("sid")
        if role not in ("user", "admin") or not isinstance(sub, str) or not sub.isdigit():
            raise _bad("The access token carries invalid claims")
        if not isinstance(sid, str) or not sid:
            raise _bad("The access token carries invalid claims")
        perms = claims.get("perms", [])
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            raise _bad("The access token carries invalid claims")
        principal = Principal(user_id=int(sub), role=role, sid=sid, perms=frozenset(perms))
        return principal, int(claims["exp"])


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _bad(message: str) -> AppError:
    return AppError(ErrorCode.UNAUTHENTICATED, message)
