"""Delivery body serialisation, signatures and their verification (SPEC §2.6, §2.7, §3.2).

Two signature schemes share one secret string: a generated ``whsec_`` + base64 one, or the user's
own (any printable string of 16+ characters, e.g. what an n8n user typed):

* ``X-PerfexAPI-Signature`` / ``X-Webhook-Signature``: lowercase hex HMAC-SHA256 of the exact body
  bytes, keyed with the whole secret string as UTF-8 (what the n8n PerfexCRM Trigger checks).
* Standard Webhooks v1 (``webhook-id`` / ``webhook-timestamp`` / ``webhook-signature``): base64
  HMAC-SHA256 of ``"{id}.{timestamp}.{body}"``, keyed with the base64-decoded part after ``whsec_``,
  or with the UTF-8 bytes of a secret without that prefix (``standard_key``). It signs the
  timestamp, so a receiver can refuse replayed captures.

Receivers' side of this is documented in docs/receivers.md, whose snippets the tests run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from app import __version__

__all__ = [
    "VerificationError",
    "build_headers",
    "dumps",
    "generate_secret",
    "hex_signature",
    "standard_key",
    "standard_signature",
    "verify",
    "verify_hex",
    "verify_standard",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300  # seconds; Standard Webhooks' recommended window

# JavaScript numbers are IEEE doubles: beyond this an integer may not survive JSON.parse.
MAX_SAFE_INTEGER = 2**53 - 1
# JS orders "array index" keys (canonical integers 0..2**32-2) first, ascending, whatever the
# order in the JSON text, so JSON.stringify(JSON.parse(body)) would move them.
_MAX_ARRAY_INDEX = 2**32 - 2

_PLAIN_TYPES = frozenset({str, type(None), bool})


# --------------------------------------------------------------------------- body serialiser


def dumps(obj: Any) -> bytes:
    """Serialise a delivery body: compact JSON that n8n's ``JSON.stringify(JSON.parse(body))``
    reproduces byte for byte (SPEC §2.7), so its hex signature matches.

    orjson already writes no spaces, ``/`` unescaped, non-ASCII as raw UTF-8 and control characters
    escaped exactly like JS. What it does differently from JS, and what we do about it:

    * floats: written as JS's ``Number.prototype.toString`` writes them (``1.0`` -> ``1``,
      ``1e21`` -> ``1e+21``, ``1e-7`` -> ``1e-7``, ``1e-6`` -> ``0.000001``). Both languages print
      the shortest digits that round-trip, so only the layout needs translating; the value (and its
      type, a JSON number) is kept; note that integral floats come out without a fraction, which
      Python's json reads back as int. NaN and infinities have no JSON form: ``ValueError``.
    * integers outside +-(2**53-1): JS would round them, so they become decimal strings.
    * dict keys that are array indices ("0", "19"): reordered first, ascending, as JS does.

    Dict keys must be ``str`` (``TypeError`` otherwise). Perfex sends every value as a string or
    null, so the common case is checked cheaply and handed straight to orjson.
    """
    if _is_plain(obj):
        return orjson.dumps(obj)
    return orjson.dumps(_normalise(obj))


def _is_plain(obj: Any) -> bool:
    """True when orjson's output for ``obj`` is already what JS would print.

    Uses C-level ``map``/``set`` over each container (about 3 us for a 60-field record, against
    about 1 us for orjson itself); anything unusual answers False and takes the careful path.
    """
    t = type(obj)
    if t is dict:
        try:
            if any(map(str.isdigit, obj)):  # over-approximates array-index keys: fine
                return False
        except TypeError:  # a non-str key: let _normalise raise a clear error
            return False
        values: Any = obj.values()
    elif t is list or t is tuple:
        values = obj
    elif t in _PLAIN_TYPES:
        return True
    elif t is int:
        return -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER
    else:
        return False
    types = set(map(type, values))
    if types <= _PLAIN_TYPES:
        return True
    if float in types:
        return False
    for v in values:
        if type(v) not in _PLAIN_TYPES and not _is_plain(v):
            return False
    return True


def _normalise(obj: Any) -> Any:
    """Copy of ``obj`` with the JS-incompatible parts rewritten (see ``dumps``)."""
    if isinstance(obj, str) or obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        n = int(obj)
        return n if -MAX_SAFE_INTEGER <= n <= MAX_SAFE_INTEGER else str(n)
    if isinstance(obj, float):
        return orjson.Fragment(_js_number(obj).encode())
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"dict keys must be str, not {type(key).__name__}: {key!r}")
        index_keys = sorted((k for k in obj if _is_array_index(k)), key=int)
        index_set = set(index_keys)
        ordered = index_keys + [k for k in obj if k not in index_set]
        return {str(k): _normalise(obj[k]) for k in ordered}
    if isinstance(obj, list | tuple):
        return [_normalise(v) for v in obj]
    # datetime, UUID, enum, dataclass...: orjson's own handling (floats nested inside a dataclass
    # are not rewritten; bodies are plain dicts, so that is not worth a walk of its own).
    return obj


def _is_array_index(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) <= _MAX_ARRAY_INDEX


def _js_number(value: float) -> str:
    """``String(value)`` as JavaScript computes it (ECMA-262 Number::toString, radix 10)."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{value!r} cannot be represented in JSON")
    if value == 0:
        return "0"  # JS prints -0 as "0" too
    sign = "-" if value < 0 else ""
    # repr() gives the shortest round-tripping digits, as JS does; recover digits s and exponent n
    # such that value = 0.s * 10**n, then lay them out by JS's rules.
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    n = len(whole) + (int(exp) if exp else 0)
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        exponent = f"e{'+' if e >= 0 else '-'}{abs(e)}"
        text = (digits if k == 1 else digits[0] + "." + digits[1:]) + exponent
    return sign + text


# --------------------------------------------------------------------------- secrets and signing


def generate_secret() -> str:
    """A new endpoint secret: ``whsec_`` + standard base64 of 32 random bytes (serves both schemes)."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


def hex_signature(body: bytes, secret: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``body``, keyed with the whole secret string (prefix included)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of ``secret``: the base64-decoded part after ``whsec_``.

    Missing padding is tolerated, as in the reference ``standardwebhooks`` library. A secret with no
    ``whsec_`` prefix, or whose remainder is not valid (non-empty) base64, is used as-is: its UTF-8
    bytes, whole string, become the key. That keeps operator-supplied secrets usable; receivers of
    such a secret must apply the same rule.
    """
    return whsec_key(secret) or secret.encode("utf-8")


def whsec_key(secret: str) -> bytes:
    """The bytes base64-encoded after ``whsec_`` (padding optional); b"" without the prefix or when
    the rest is not base64."""
    if not secret.startswith(SECRET_PREFIX):
        return b""
    rest = secret[len(SECRET_PREFIX) :]
    try:
        return base64.b64decode(rest + "=" * (-len(rest) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


def standard_signature(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """``v1,`` + base64 HMAC-SHA256 of ``"{msg_id}.{timestamp}." + body`` (Standard Webhooks v1)."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


_PRINTABLE_ASCII = re.compile(r"[ -~]+")


def _header_safe(name: str, value: str) -> str:
    # Event names and delivery ids end up in header values: anything but printable ASCII (CR/LF
    # above all) could split or smuggle headers, so refuse it rather than sanitise it.
    if not _PRINTABLE_ASCII.fullmatch(value):
        raise ValueError(f"{name} must be non-empty printable ASCII, got {value!r}")
    return value


def build_headers(
    body: bytes,
    *,
    delivery_id: str,
    event: str,
    timestamp: int,
    attempt: int,
    secrets: Sequence[str],
    version: str = __version__,
) -> dict[str, str]:
    """Every header of a delivery (SPEC §3.2), for ``body`` as it will be sent.

    ``secrets`` are the endpoint's live secrets, primary first, then the grace secret if any: the hex
    headers use the primary only, ``webhook-signature`` carries one ``v1,...`` per secret.
    """
    if not secrets:
        raise ValueError("at least one secret (the primary) is required")
    _header_safe("delivery_id", delivery_id)
    _header_safe("event", event)
    ts = int(timestamp)
    primary_hex = hex_signature(body, secrets[0])
    return {
        "Content-Type": "application/json",
        "User-Agent": f"perfex-webhooks/{version}",
        "X-PerfexAPI-Signature": primary_hex,
        "X-Webhook-Signature": primary_hex,
        "X-PerfexAPI-Delivery": delivery_id,
        "X-PerfexAPI-Event": event,
        "X-PerfexAPI-Timestamp": str(ts),
        "X-PerfexAPI-Attempt": str(int(attempt)),
        "webhook-id": delivery_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(standard_signature(delivery_id, ts, body, s) for s in secrets),
    }


# --------------------------------------------------------------------------- verification (receivers)


class VerificationError(Exception):
    """A delivery failed verification; the message says why (never includes a secret)."""


def verify_hex(body: bytes, signature: str, secrets: Sequence[str]) -> bool:
    """True if ``signature`` (the X-PerfexAPI-Signature / X-Webhook-Signature value) is the hex
    HMAC of ``body`` under any of ``secrets``. Constant-time comparison."""
    given = signature.encode("utf-8", "replace")
    return any(hmac.compare_digest(hex_signature(body, s).encode("ascii"), given) for s in secrets)


def verify_standard(
    body: bytes,
    msg_id: str,
    timestamp: str | int,
    signature_header: str,
    secrets: Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True if the Standard Webhooks headers are valid for ``body``: ``timestamp`` within
    ``tolerance`` seconds of ``now`` (either side) and any ``v1,...`` entry of ``signature_header``
    matching any of ``secrets``."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    given = [
        sig.encode("utf-8", "replace")
        for version, _, sig in (entry.partition(",") for entry in signature_header.split())
        if version == "v1"
    ]
    for secret in secrets:
        expected = standard_signature(msg_id, ts, body, secret)[3:].encode("ascii")
        # Evaluate every entry (no short-circuit inside one secret) to keep timing uniform.
        if any([hmac.compare_digest(expected, g) for g in given]):
            return True
    return False


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
    require_standard: bool = False,
) -> None:
    """Verify a received delivery; raise ``VerificationError`` with the reason if it is not genuine.

    ``headers`` may use any case. ``secrets``: every secret the receiver accepts (during a rotation,
    the new and the old one). When ``webhook-signature`` is present it decides: its timestamp must be
    within ``tolerance`` and one of its signatures must match. The hex headers are not required
    then: they carry the primary secret only, and a receiver still holding the grace secret must
    pass. Without Standard Webhooks headers, ``X-PerfexAPI-Signature`` (or ``X-Webhook-Signature``)
    is checked, which proves authenticity but not freshness; ``require_standard=True`` refuses that
    fallback so that a capture replayed with its ``webhook-*`` headers stripped is rejected.
    """
    if not secrets:
        raise VerificationError("no secret configured")
    h = {k.lower(): v for k, v in headers.items()}
    std_sig = h.get("webhook-signature")
    if std_sig is not None:
        msg_id, ts_text = h.get("webhook-id"), h.get("webhook-timestamp")
        if not msg_id or not ts_text:
            raise VerificationError("webhook-signature without webhook-id and webhook-timestamp")
        try:
            ts = int(ts_text)
        except ValueError:
            raise VerificationError("webhook-timestamp is not an integer") from None
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance:
            raise VerificationError(f"webhook-timestamp is outside the {tolerance}s tolerance")
        if not verify_standard(body, msg_id, ts, std_sig, secrets, tolerance, current):
            raise VerificationError("no webhook-signature matches any secret")
        return
    if require_standard:
        raise VerificationError("missing webhook-signature header")
    hex_sig = h.get("x-perfexapi-signature") or h.get("x-webhook-signature")
    if hex_sig is None:
        raise VerificationError("no signature header")
    if not verify_hex(body, hex_sig, secrets):
        raise VerificationError("signature does not match any secret")
