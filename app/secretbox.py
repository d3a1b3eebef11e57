"""Endpoint secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) under
`WEBHOOKS_SECRETS_KEY`, one key or several comma-separated for rotation (newest first).

A sealed value is `fernet:<token>` in the registry record; a value without the prefix is a secret
written in clear (before a key was set, or by a writer without one) and is read as it is, so turning
encryption on needs no migration step and `perfex-webhooks endpoints re-encrypt` seals the rest.
"""

from __future__ import annotations

import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.errors import ConfigError

PREFIX = "fernet:"


class SecretsKeyError(ValueError):
    """A sealed secret that none of the configured keys opens (the message names no secret)."""


class SecretBox:
    def __init__(self, keys: list[Fernet]) -> None:
        self._fernet = MultiFernet(keys)

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def from_keys(text: str) -> SecretBox:
        keys = []
        for i, part in enumerate(p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                keys.append(Fernet(part))
            except (ValueError, TypeError):
                raise ConfigError(
                    f"WEBHOOKS_SECRETS_KEY: key {i + 1} is not a Fernet key (32 url-safe base64 bytes; "
                    "make one with `perfex-webhooks secrets-key`)"
                ) from None  # the exception would carry the key text
        if not keys:
            raise ConfigError("WEBHOOKS_SECRETS_KEY: no key given")
        return SecretBox(keys)

    def seal(self, secret: str) -> str:
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, value: str) -> str:
        if not value.startswith(PREFIX):
            return value
        try:
            return self._fernet.decrypt(value[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretsKeyError("no key of WEBHOOKS_SECRETS_KEY opens this secret") from None


def box_for(secrets_key: str | None) -> SecretBox | None:
    return SecretBox.from_keys(secrets_key) if secrets_key else None


def open_value(box: SecretBox | None, value: str) -> str:
    """The clear secret of a record value; sealed values need a box."""
    if value.startswith(PREFIX):
        if box is None:
            raise SecretsKeyError("the secret is encrypted and WEBHOOKS_SECRETS_KEY is not set")
        return box.open(value)
    return value


def new_key() -> str:
    return Fernet.generate_key().decode()
