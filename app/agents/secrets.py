"""Agent secrets (``api_key``, ``secret``) at rest: encrypted under a key derived from
``SECRET_KEY``.

The stored form is ``enc:v1:<Fernet token>``; the Fernet key is HKDF-SHA256 of the secret key
(with a purpose of its own, so it is never the key that signs connection strings). Values are
encrypted with ``SECRET_KEY`` and decrypted with it or any of ``SECRET_KEY_FALLBACKS``
(MultiFernet), so a key rotation keeps stored secrets readable. A legacy plaintext value (stored
before encryption existed) still works, and is encrypted the next time its workspace is saved.
Decrypt only where an agent uses the value (``reveal``).
"""
from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import current_app

from app.agents.base import AgentError

PREFIX = "enc:v1:"
#: Agent fields that are secrets: stored sealed, never returned (app.schemas.public_agent).
SECRET_FIELDS = ("api_key", "secret")
_INFO = b"workspace-chat agent secrets v1"


class SecretUnreadable(AgentError):
    def __init__(self) -> None:
        super().__init__("its stored secret can't be read (SECRET_KEY changed without the old "
                         "key in SECRET_KEY_FALLBACKS?)")


@lru_cache(maxsize=32)
def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=_INFO).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _keys(config: Any = None) -> MultiFernet:
    config = config if config is not None else current_app.config
    keys = [config["SECRET_KEY"], *(config.get("SECRET_KEY_FALLBACKS") or [])]
    return MultiFernet([_fernet(str(k)) for k in keys if k])


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def seal(value: str, config: Any = None) -> str:
    """The stored form of a secret. An already sealed value is re-encrypted under the current
    key when it can be read, and kept as it is when it cannot."""
    keys = _keys(config)
    if is_sealed(value):
        try:
            return PREFIX + keys.rotate(value[len(PREFIX):].encode()).decode()
        except InvalidToken:
            return value
    return PREFIX + keys.encrypt(value.encode()).decode()


def reveal(value: str | None, config: Any = None) -> str | None:
    """The plaintext of a stored secret (a legacy plaintext value as it is);
    SecretUnreadable (an AgentError) when no key opens it."""
    if not is_sealed(value):
        return value
    try:
        return _keys(config).decrypt(value[len(PREFIX):].encode()).decode()
    except (InvalidToken, ValueError):
        raise SecretUnreadable() from None


def seal_agent(agent: dict[str, Any], config: Any = None) -> dict[str, Any]:
    """An agent configuration with every secret in its stored (encrypted) form."""
    sealed = dict(agent)
    for name in SECRET_FIELDS:
        if isinstance(sealed.get(name), str) and sealed[name]:
            sealed[name] = seal(sealed[name], config)
    return sealed


def has_plaintext(agent: dict[str, Any] | None) -> bool:
    return any(isinstance((agent or {}).get(n), str) and (agent or {}).get(n)
               and not is_sealed(agent[n]) for n in SECRET_FIELDS)
