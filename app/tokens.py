"""Connection strings and message strings: signed (itsdangerous) and time-limited."""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer
from itsdangerous.encoding import base64_encode

from app.errors import ApiError
from app.timefmt import iso_z

CONNECTION_SALT = "workspace-chat.connection-string"
MESSAGE_SALT = "workspace-chat.message-string"


class TokenInvalid(Exception):
    """The string is not genuine (bad signature, wrong shape, wrong purpose)."""


class TokenExpired(Exception):
    """The string is genuine but past its expiry."""

    def __init__(self, payload: dict[str, Any]):
        super().__init__("expired")
        self.payload = payload


def _serializer(salt: str) -> URLSafeSerializer:
    config = current_app.config
    return _serializer_for(salt, tuple(config.get("SECRET_KEY_FALLBACKS", [])),
                           config["SECRET_KEY"])


class _Serializer(URLSafeSerializer):
    """itsdangerous's URL-safe serializer, signing its payload uncompressed.

    URLSafeSerializer tries zlib on every payload it signs and keeps the result when shorter:
    for a string's hundred-odd bytes of JSON that try cost about 27 µs, most of signing one
    (a message string is signed on every connect and every message). Reading is unchanged:
    ``loads`` takes both forms (a compressed payload starts with ".")."""

    def dump_payload(self, obj: Any) -> bytes:
        return base64_encode(self.serializer.dumps(obj, **self.serializer_kwargs))


@lru_cache(maxsize=32)
def _serializer_for(salt: str, fallbacks: tuple[str, ...], key: str) -> URLSafeSerializer:
    # itsdangerous signs with the last key and verifies with all, which is key rotation.
    # Built once per key set: two strings are verified or signed for every message.
    return _Serializer([*fallbacks, key], salt=salt)


def to_iso(ts: float) -> str:
    """A Unix time as ISO 8601 UTC with a trailing Z."""
    return iso_z(datetime.fromtimestamp(ts, timezone.utc))


def _issue(salt: str, payload: dict[str, Any], ttl: int) -> tuple[str, float]:
    expires = time.time() + ttl
    token = _serializer(salt).dumps({**payload, "exp": round(expires, 3)})
    return token, expires


def _verify(salt: str, token: Any) -> dict[str, Any]:
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise TokenInvalid()
    try:
        payload = _serializer(salt).loads(token)
    except (BadSignature, UnicodeError, ValueError):
        raise TokenInvalid() from None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), (int, float)):
        raise TokenInvalid()
    if payload["exp"] < time.time():
        raise TokenExpired(payload)
    return payload


def issue_connection_string(tenant_id: str, user_id: str, chat_id: str,
                            api_key_id: str | None = None) -> tuple[str, float]:
    """A connection string for one user to join one chat; returns it and its expiry time.

    ``api_key_id`` (claim ``k``) binds it to the API key that asked for it: when that key is
    revoked, the string stops working.
    """
    ttl = current_app.config["CONNECTION_STRING_TTL"]
    payload = {"t": tenant_id, "u": user_id, "c": chat_id}
    if api_key_id is not None:
        payload["k"] = api_key_id
    return _issue(CONNECTION_SALT, payload, ttl)


def verify_connection_string(token: Any) -> dict[str, Any]:
    """The payload ``{t, u, c, k?, exp}`` of a genuine, unexpired connection string."""
    payload = _verify(CONNECTION_SALT, token)
    if not all(isinstance(payload.get(k), str) for k in ("t", "u", "c")):
        raise TokenInvalid()
    if "k" in payload and not isinstance(payload["k"], str):
        raise TokenInvalid()
    return payload


def issue_message_string(tenant_id: str, user_id: str, chat_id: str, sid: str) -> tuple[str, float]:
    """A single-use message string bound to one connection; returns it and its expiry time."""
    ttl = current_app.config["MESSAGE_STRING_TTL"]
    payload = {"t": tenant_id, "u": user_id, "c": chat_id, "s": sid, "j": secrets.token_hex(8)}
    return _issue(MESSAGE_SALT, payload, ttl)


def verify_message_string(token: Any) -> dict[str, Any]:
    """The payload ``{t, u, c, s, j, exp}`` of a genuine, unexpired message string."""
    payload = _verify(MESSAGE_SALT, token)
    if not all(isinstance(payload.get(k), str) for k in ("t", "u", "c", "s", "j")):
        raise TokenInvalid()
    return payload


_VERIFIERS = {"connection_string": verify_connection_string,
              "message_string": verify_message_string}


def claims_or_refuse(kind: str, token: Any) -> dict[str, Any]:
    """The claims of a genuine, unexpired ``kind`` ("connection_string" or "message_string"),
    else the contract's error: ``{kind}_expired`` or ``invalid_{kind}``."""
    name = kind.replace("_", " ")
    try:
        return _VERIFIERS[kind](token)
    except TokenExpired:
        raise ApiError(f"{kind}_expired", f"The {name} has expired; ask for a new one.") from None
    except TokenInvalid:
        raise ApiError(f"invalid_{kind}", f"The {name} is not valid.") from None
