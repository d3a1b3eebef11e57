"""Signatures, headers and the body serialiser (SPEC §2.6, §2.7, §3.2); no Kafka needed.

Node.js checks run the verification snippet from docs/receivers.md and n8n's
``JSON.stringify(JSON.parse(body))`` in one node process per test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import random
import re
import struct
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import app
from app import signing
from app.delivery import Delivery
from app.endpoints import FORMATS, validate_secret
from app.signing import (
    VerificationError,
    build_headers,
    dumps,
    generate_secret,
    hex_signature,
    standard_key,
    standard_signature,
    verify,
    verify_hex,
    verify_standard,
)
from tests.helpers import require_tool

DOC = Path(__file__).resolve().parents[1] / "docs" / "receivers.md"

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER = "whsec_" + base64.b64encode(b"\x01" * 32).decode()
MAX_SAFE = 2**53 - 1
USER_SECRET = "my n8n secret: Zoë's 東京 key!"  # what an n8n user types: no prefix, not base64


def _delivery(payload: dict[str, Any], **kw: Any) -> Delivery:
    fields: dict[str, Any] = {
        "id": "dlv_n8n",
        "endpoint_id": "ep_1",
        "event": "invoice.paid",
        "event_id": "evt_1",
        "occurred_at": "2026-11-27T10:00:00.123Z",
        "occurred_ts": 1764237600.123,
        "resource_key": "invoice:1",
        "data": payload,
    }
    return Delivery(**{**fields, **kw})


def _headers(body: bytes, secrets: list[str], *, ts: int | None = None, **kw: Any) -> dict[str, str]:
    args: dict[str, Any] = {"delivery_id": "dlv_test1", "event": "invoice.paid", "attempt": 1}
    args.update(kw)
    return build_headers(body, timestamp=int(time.time()) if ts is None else ts, secrets=secrets, **args)


def _doc_block(heading: str, lang: str) -> str:
    """The first fenced ``lang`` block after ``heading`` in docs/receivers.md."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(heading + "\n")
    m = re.compile(rf"^```{lang}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert m, f"no ```{lang} block under {heading!r}"
    return m.group(1)


def _run_node(tmp_path: Path, script: str, records: list[dict[str, Any]]) -> list[Any]:
    """Run ``script`` once; it reads JSON lines from stdin and prints one JSON line per record."""
    path = tmp_path / "check.js"
    path.write_text(script, encoding="utf-8")
    stdin = "".join(json.dumps(r) + "\n" for r in records)
    proc = subprocess.run(
        [require_tool("node"), str(path)], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


_NODE_READ_LINES = """
const lines = require('node:fs').readFileSync(0, 'utf8').split('\\n').filter(Boolean);
for (const line of lines) { const r = JSON.parse(line); console.log(JSON.stringify(check(r))); }
"""


# ----------------------------------------------------------------------------- known answers


def test_standard_webhooks_known_answer() -> None:
    body = b'{"test": 2432232314}'
    sig = standard_signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, SECRET)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    ts = datetime.fromtimestamp(1614265330, tz=UTC)
    assert Webhook(SECRET).sign("msg_p5jXN8AQM9LWM0D4loKWxJek", ts, body.decode()) == sig


def test_hex_signature_keys_with_whole_secret_string() -> None:
    body = b'{"id":"dlv_1"}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hex_signature(body, SECRET) == expected
    assert expected == expected.lower() and len(expected) == 64


def test_generate_secret() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b
    for s in (a, b):
        assert s.startswith("whsec_")
        assert len(base64.b64decode(s[6:], validate=True)) == 32
        assert standard_key(s) == base64.b64decode(s[6:])
        Webhook(s)  # accepted by the reference library


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        (SECRET, base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
        ("whsec_YWJj", b"abc"),
        ("whsec_YWJjZA", b"abcd"),  # unpadded, as the reference library allows
        ("plain-secret", b"plain-secret"),  # no prefix: the whole string
        ("whsec_not base64!", b"whsec_not base64!"),  # invalid base64: the whole string
        ("whsec_", b"whsec_"),  # empty key: the whole string
        ("sécret", "sécret".encode()),
    ],
)
def test_standard_key(secret: str, key: bytes) -> None:
    assert standard_key(secret) == key


# ----------------------------------------------------------------------------- headers


def test_build_headers_contract() -> None:
    body = dumps({"id": "dlv_42", "event": "invoice.paid", "data": {"id": "19"}})
    h = build_headers(
        body, delivery_id="dlv_42", event="invoice.paid", timestamp=1764237600, attempt=3, secrets=[SECRET]
    )
    assert h == {
        "Content-Type": "application/json",
        "User-Agent": f"perfex-webhooks/{app.__version__}",
        "X-PerfexAPI-Signature": hex_signature(body, SECRET),
        "X-Webhook-Signature": hex_signature(body, SECRET),
        "X-PerfexAPI-Delivery": "dlv_42",
        "X-PerfexAPI-Event": "invoice.paid",
        "X-PerfexAPI-Timestamp": "1764237600",
        "X-PerfexAPI-Attempt": "3",
        "webhook-id": "dlv_42",
        "webhook-timestamp": "1764237600",
        "webhook-signature": standard_signature("dlv_42", 1764237600, body, SECRET),
    }
    assert build_headers(
        body, delivery_id="d", event="e", timestamp=1, attempt=1, secrets=[SECRET], version="9.9"
    )["User-Agent"] == ("perfex-webhooks/9.9")


def test_build_headers_rotation_signs_with_every_live_secret() -> None:
    body = b'{"a":"b"}'
    h = _headers(body, [OTHER, SECRET], ts=1700000000)
    assert h["X-PerfexAPI-Signature"] == hex_signature(body, OTHER)  # primary only
    assert h["webhook-signature"].split(" ") == [
        standard_signature("dlv_test1", 1700000000, body, OTHER),
        standard_signature("dlv_test1", 1700000000, body, SECRET),
    ]
    with pytest.raises(ValueError):
        _headers(body, [])


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "tab\there", "del\x7f", "é", ""])
@pytest.mark.parametrize("field", ["event", "delivery_id"])
def test_header_injection_refused(field: str, bad: str) -> None:
    with pytest.raises(ValueError):
        _headers(b"{}", [SECRET], **{field: bad})


# ----------------------------------------------------------------------------- standardwebhooks library


def test_reference_library_verifies_our_headers() -> None:
    body = dumps({"id": "dlv_1", "data": {"name": "Zoë 東京 😀", "url": "https://x/y"}})
    h = _headers(body, [SECRET])
    assert Webhook(SECRET).verify(body, h) == orjson.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", h)


def test_reference_library_verifies_during_rotation() -> None:
    new, old, stranger = generate_secret(), generate_secret(), generate_secret()
    body = dumps({"id": "dlv_2", "event": "lead.created"})
    h = _headers(body, [new, old])
    Webhook(new).verify(body, h, json_parse=False)
    Webhook(old).verify(body, h, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, h)


def test_we_verify_reference_library_signatures() -> None:
    body = b'{"x":"1"}'
    now = int(time.time())
    sig = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(now, tz=UTC), body.decode())
    assert verify_standard(body, "msg_1", str(now), sig, [SECRET])
    assert not verify_standard(body, "msg_2", str(now), sig, [SECRET])



# ----------------------------------------------------------------------------- any secret, both formats


def test_user_secret_any_printable_string_of_16_or_more() -> None:
    for ok in (USER_SECRET, "x" * 16, "sixteen chars!!!", "whsec_" + base64.b64encode(b"k" * 16).decode()):
        assert validate_secret(ok) == ok
    for bad in ("x" * 15, "tab\tinside-the-secret", "newline\n-in-the-secret", "x" * 1025, "whsec_not base64 at all!!"):
        with pytest.raises(ValueError, match="secret"):
            validate_secret(bad)
    # The hex headers key with the string as UTF-8; Standard Webhooks too, without the whsec_ prefix.
    body = _delivery({"id": "1", "note": "Zoë"}).body(1764237600)
    h = _headers(body, [USER_SECRET])
    assert h["X-Webhook-Signature"] == hmac.new(USER_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert standard_key(USER_SECRET) == USER_SECRET.encode("utf-8")
    verify(body, h, [USER_SECRET], require_standard=True)
    assert verify_hex(body, h["X-PerfexAPI-Signature"], [USER_SECRET])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["generated", "user"])
def test_reference_library_verifies_both_secret_kinds_and_formats(fmt: str, kind: str) -> None:
    secret = generate_secret() if kind == "generated" else USER_SECRET
    # The library decodes a whsec_ secret itself; a user's secret is given as its UTF-8 key bytes.
    lib = Webhook(secret) if kind == "generated" else Webhook(secret.encode("utf-8"))
    d = _delivery({"id": "19", "total": "21.80"}, previous={"status": "3"}, collapsed=4)
    body = d.body(int(time.time()), fmt)
    h = {**_headers(body, [secret], delivery_id=d.id), **d.format_headers(fmt)}
    assert lib.verify(body, h) == orjson.loads(body)
    with pytest.raises(WebhookVerificationError):
        (Webhook(generate_secret())).verify(body, h)


def test_body_formats() -> None:
    d = _delivery({"id": "19", "url": "https://x/y"}, previous={"status": "3"}, collapsed=4)
    assert d.body(1764237600) == d.body(1764237600, "perfexapi") == (
        b'{"id":"dlv_n8n","event":"invoice.paid","event_id":"evt_1","timestamp":1764237600,'
        b'"occurred_at":"2026-11-27T10:00:00.123Z","payload":{"id":"19","url":"https://x/y"},'
        b'"previous":{"status":"3"},"collapsed":4}'
    )
    assert d.format_headers("perfexapi") == {}
    assert d.body(1764237600, "standard") == (
        b'{"type":"invoice.paid","timestamp":"2026-11-27T10:00:00.123Z","data":{"id":"19","url":"https://x/y"}}'
    )
    assert d.format_headers("standard") == {"X-PerfexAPI-Event-Id": "evt_1", "X-PerfexAPI-Collapsed": "4"}
    # An event id that is no safe header value is left out, never sent raw.
    assert "X-PerfexAPI-Event-Id" not in _delivery({}, event_id="evt\r\nX: y").format_headers("standard")


# ----------------------------------------------------------------------------- verify


def test_verify_accepts_fresh_delivery_and_is_case_insensitive() -> None:
    body = b'{"a":"1"}'
    h = _headers(body, [SECRET])
    verify(body, h, [SECRET])
    verify(body, {k.upper(): v for k, v in h.items()}, [SECRET])


def test_verify_timestamp_tolerance() -> None:
    body = b'{"a":"1"}'
    now = 1_800_000_000
    old = _headers(body, [SECRET], ts=now - 301)
    with pytest.raises(VerificationError, match="tolerance"):
        verify(body, old, [SECRET], now=now)
    with pytest.raises(VerificationError, match="tolerance"):
        verify(body, _headers(body, [SECRET], ts=now + 301), [SECRET], now=now)
    verify(body, _headers(body, [SECRET], ts=now - 300), [SECRET], now=now)
    verify(body, old, [SECRET], now=now, tolerance=600)
    assert not verify_standard(body, "dlv_test1", now - 301, old["webhook-signature"], [SECRET], now=now)


def test_verify_grace_secret_accepted_unknown_rejected() -> None:
    new, old = generate_secret(), generate_secret()
    body = b'{"a":"1"}'
    h = _headers(body, [new, old])
    verify(body, h, [old])  # receiver not yet updated: Standard Webhooks carries the grace signature
    verify(body, h, [new])
    verify(body, h, [old, new])
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(body, h, [generate_secret()])
    hex_only = {k: v for k, v in h.items() if not k.startswith("webhook-")}
    verify(body, hex_only, [old, new])  # receiver holding both accepts the primary's hex signature
    with pytest.raises(VerificationError, match="does not match"):
        verify(body, hex_only, [old])  # hex carries the primary only
    assert verify_hex(body, h["X-PerfexAPI-Signature"], [old, new])
    assert not verify_hex(body, h["X-PerfexAPI-Signature"], [old])


def test_verify_hex_fallbacks_and_errors() -> None:
    body = b'{"a":"1"}'
    h = _headers(body, [SECRET])
    perfex_only = {"X-PerfexAPI-Signature": h["X-PerfexAPI-Signature"]}
    n8n_only = {"x-webhook-signature": h["X-Webhook-Signature"]}
    verify(body, perfex_only, [SECRET])
    verify(body, n8n_only, [SECRET])
    with pytest.raises(VerificationError, match="missing webhook-signature"):
        verify(body, perfex_only, [SECRET], require_standard=True)
    verify(body, h, [SECRET], require_standard=True)
    with pytest.raises(VerificationError, match="no signature header"):
        verify(body, {"Content-Type": "application/json"}, [SECRET])
    with pytest.raises(VerificationError, match="no secret"):
        verify(body, h, [])
    with pytest.raises(VerificationError, match="does not match"):
        verify(body, {"X-PerfexAPI-Signature": h["X-PerfexAPI-Signature"].upper()}, [SECRET])
    with pytest.raises(VerificationError, match="webhook-id"):
        verify(body, {"webhook-signature": h["webhook-signature"]}, [SECRET])
    with pytest.raises(VerificationError, match="not an integer"):
        verify(body, {**h, "webhook-timestamp": "12.5"}, [SECRET])
    assert not verify_standard(body, "dlv_test1", "soon", h["webhook-signature"], [SECRET])
    assert not verify_hex(body, "\udcff" + h["X-PerfexAPI-Signature"][1:], [SECRET])


# ----------------------------------------------------------------------------- dumps


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"a": "b", "c": None}, '{"a":"b","c":null}'),
        ({"u": "/ </script> é 東京 😀"}, '{"u":"/ </script> é 東京 😀"}'),
        (
            {"ctl": '\x00\b\t\n\f\r\x1f\x7f\u2028"\\'},
            '{"ctl":"\\u0000\\b\\t\\n\\f\\r\\u001f\x7f\u2028\\"\\\\"}',
        ),
        ([0, -1, True, False, "", [], {}], '[0,-1,true,false,"",[],{}]'),
        (
            [1.0, -2.0, 0.1, 1e21, 1e-7, 1e-6, -0.0, 2.0**60],
            "[1,-2,0.1,1e+21,1e-7,0.000001,0,1152921504606847000]",
        ),
        ([MAX_SAFE, -MAX_SAFE, MAX_SAFE + 1, -(2**60), 2**70], None),
        ({"b": "1", "10": "x", "2": "y", "01": "z", "-1": "w", "4294967295": "v", "4294967294": "u"}, None),
        (("tuple", 1.5), '["tuple",1.5]'),
    ],
)
def test_dumps_examples(value: Any, text: str | None) -> None:
    out = dumps(value)
    if text is not None:
        assert out == text.encode()
    if isinstance(value, list) and value and value[0] == MAX_SAFE:
        assert (
            out
            == b'[9007199254740991,-9007199254740991,"9007199254740992","-1152921504606846976","%d"]'
            % (2**70)
        )
    if isinstance(value, dict) and "4294967294" in value:
        # JS moves array-index keys first, ascending; "01", "-1" and 2**32-1 are ordinary keys.
        assert list(orjson.loads(out)) == ["2", "10", "4294967294", "b", "01", "-1", "4294967295"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"a": [1, {"b": math.nan}]}])
def test_dumps_rejects_non_finite(bad: Any) -> None:
    with pytest.raises(ValueError):
        dumps(bad)


@pytest.mark.parametrize("bad", [{1: "a"}, {"a": {None: 1}}, [{("t",): 1}], {"a": 1.5, 2: "x"}])
def test_dumps_rejects_non_str_keys(bad: Any) -> None:
    with pytest.raises(TypeError):
        dumps(bad)


def _perfex_body(fields: int = 60) -> dict[str, Any]:
    data = {f"field_{i}": (f"value {i} é/</x>" if i % 3 else None) for i in range(fields)}
    return {
        "id": "dlv_01JD3Z8Y4V0QK3",
        "event": "invoice.paid",
        "event_id": "evt_01JD3Z8Y4V",
        "timestamp": 1764237600,
        "occurred_at": "2026-11-27T10:00:00.123Z",
        "payload": data,
        "previous": {"status": "3"},
        "collapsed": 3,
    }


def test_dumps_fast_path_for_perfex_shaped_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    body = _perfex_body()
    expected = orjson.dumps(body)

    def boom(obj: Any) -> Any:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(signing, "_normalise", boom)
    assert dumps(body) == expected
    # Anything that needs rewriting leaves the fast path.
    for tweak in ({"amount": 1.5}, {"big": 2**53}, {"7": "x"}, {"t": (1.5,)}):
        with pytest.raises(AssertionError, match="slow path"):
            dumps({**body, "payload": {**body["payload"], **tweak}})


# ----------------------------------------------------------------------------- Node.js


def test_node_snippet_from_docs_verifies_deliveries(tmp_path: Path) -> None:
    snippet = _doc_block("### Node.js", "js")
    assert "timingSafeEqual" in snippet
    harness = """
function check(r) {
  const body = Buffer.from(r.body, 'base64');
  const hex = verifyHex(body, r.headers['x-perfexapi-signature'], r.secrets);
  const n8n = verifyHex(body, r.headers['x-webhook-signature'], r.secrets);
  return [hex, n8n, verifyStandard(body, r.headers, r.secrets)];
}
"""
    new, old = generate_secret(), generate_secret()
    cases: list[tuple[bytes, dict[str, str], list[str], list[bool]]] = []
    for payload in ({"id": "dlv_1", "data": {"name": "Zoë 東京 😀 </script>"}}, {"n": [1, 0.5, None]}):
        body = dumps(payload)
        h = _headers(body, [SECRET])
        cases.append((body, h, [SECRET], [True, True, True]))
        cases.append((body[:-1] + b" }", h, [SECRET], [False, False, False]))  # tampered body
        cases.append((body, h, [OTHER], [False, False, False]))  # unknown secret
    body = _delivery({"id": "7"}).body(int(time.time()))
    cases.append((body, _headers(body, [USER_SECRET]), [USER_SECRET], [True, True, True]))  # typed secret
    body = dumps({"id": "dlv_rot"})
    rot = _headers(body, [new, old])
    cases.append((body, rot, [old], [False, False, True]))  # receiver still on the grace secret
    cases.append((body, rot, [old, new], [True, True, True]))
    stale = _headers(body, [SECRET], ts=int(time.time()) - 301)
    cases.append((body, stale, [SECRET], [True, True, False]))  # replayed capture: timestamp too old
    records = [
        {"body": base64.b64encode(b).decode(), "headers": {k.lower(): v for k, v in h.items()}, "secrets": s}
        for b, h, s, _ in cases
    ]
    assert _run_node(tmp_path, snippet + harness + _NODE_READ_LINES, records) == [c[3] for c in cases]


def test_python_snippet_from_docs_verifies_deliveries() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_doc_block("### Python", "python"), str(DOC), "exec"), namespace)
    verify_hex_doc, verify_standard_doc = namespace["verify_hex"], namespace["verify_standard"]
    new, old = generate_secret(), generate_secret()
    body = dumps({"id": "dlv_1", "data": {"name": "Zoë 😀"}})
    h = _headers(body, [new, old])
    assert verify_hex_doc(body, h["X-PerfexAPI-Signature"], [new])
    assert not verify_hex_doc(body, h["X-PerfexAPI-Signature"], [old])
    assert not verify_hex_doc(body + b" ", h["X-PerfexAPI-Signature"], [new])
    assert verify_standard_doc(body, h, [old])
    assert verify_standard_doc(body, h, [new])
    assert not verify_standard_doc(body, h, [generate_secret()])
    assert not verify_standard_doc(body.replace(b"1", b"2"), h, [new])
    assert not verify_standard_doc(body, _headers(body, [new], ts=int(time.time()) - 301), [new])
    mine = _headers(body, [USER_SECRET])  # a typed secret, no whsec_ prefix
    assert verify_hex_doc(body, mine["X-Webhook-Signature"], [USER_SECRET])
    assert verify_standard_doc(body, mine, [USER_SECRET]) and not verify_standard_doc(body, mine, [new])


_CHARS = (
    [chr(c) for c in range(0x20)]
    + list("\x7f\u2028\u2029\"\\/<>&'")
    + list("aZ09 ._-:")
    + list("éßñ東京中文한국어😀🎉\u0301\ufeff\U0010ffff")
)
_KEYS = [
    "id",
    "name",
    "",
    "0",
    "1",
    "2",
    "10",
    "01",
    "-1",
    "1.5",
    "4294967294",
    "4294967295",
    "__proto__",
    "é",
]


def _random_value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice(
            [0, -1, 1, MAX_SAFE, -MAX_SAFE, 2**53, 2**63, 2**64 + 1, rnd.randint(-(10**20), 10**20)]
        )
    if kind == 3:
        while True:
            f = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
            if math.isfinite(f):
                return rnd.choice(
                    [f, round(f % 1000, rnd.randrange(6)), float(rnd.randint(-(10**25), 10**25))]
                )
    if kind in (4, 5):
        return "".join(rnd.choice(_CHARS) for _ in range(rnd.randrange(12)))
    if kind in (6, 7):
        return {
            rnd.choice([*_KEYS, str(rnd.randrange(100))]): _random_value(rnd, depth + 1) for _ in range(4)
        }
    return [_random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]


_N8N_CHECK = """
const crypto = require('node:crypto');
function check(r) {
  const raw = Buffer.from(r.body, 'base64');
  const again = Buffer.from(JSON.stringify(JSON.parse(raw.toString('utf8'))), 'utf8');
  // What the n8n PerfexCRM Trigger computes, given the parsed body and its Secret field.
  const parsed = JSON.parse(raw.toString('utf8'));
  const n8nSig = crypto.createHmac('sha256', r.secret).update(JSON.stringify(parsed)).digest('hex');
  return again.equals(raw) && n8nSig === r.sig ? true : again.toString('base64');
}
"""


def test_bodies_survive_n8n_round_trip(tmp_path: Path) -> None:
    fixed: list[Any] = [
        {"text": "Zoë Ångström 東京 中文 한국어 😀🎉", "path": "a/b/c", "html": "</script><b>&amp;</b>"},
        {"nested": {"list": [1, [2, [3, {"deep": ["x", None, True, False]}]], {}], "empty": ""}},
        {"ints": [0, -0, -1, 1, -42, MAX_SAFE, -MAX_SAFE, 2**53, 2**60, -(2**64)]},
        {"floats": [1.0, 0.1, 1e21, 1e-7, 1e-6, 2.0**60, -0.0, 5e-324, 1.7976931348623157e308, 123.456, 0.3]},
        {"controls": "".join(chr(c) for c in range(0x20)) + '\x7f\u2028\u2029"\\'},
        {"b": "1", "10": "x", "2": "y", "01": "z", "-1": "w", "4294967295": "v", "4294967294": "u"},
        _perfex_body(),
        [],
        {},
        "just a string",
        None,
    ]
    rnd = random.Random(20261127)
    payloads = fixed + [_random_value(rnd) for _ in range(400)]
    # Thousands of random doubles in a single body: exercises the JS number layout exhaustively.
    payloads.append([struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(5000)])
    payloads[-1] = [f for f in payloads[-1] if math.isfinite(f)]
    payloads.append([m * 10.0**e for e in range(-320, 300) for m in (1.0, 1.5, 9.87654321)])
    bodies = [dumps(p) for p in payloads]
    # Whole delivery bodies in both formats, around every object payload, with a user's own secret.
    for p in payloads:
        if isinstance(p, dict):
            d = _delivery(p)
            bodies += [d.body(1764237600, fmt) for fmt in FORMATS]
    records = []
    for body in bodies:
        records.append(
            {"body": base64.b64encode(body).decode(), "secret": SECRET, "sig": hex_signature(body, SECRET)}
        )
    for body in bodies[-4:]:
        records.append({"body": base64.b64encode(body).decode(), "secret": USER_SECRET, "sig": hex_signature(body, USER_SECRET)})
    results = _run_node(tmp_path, _N8N_CHECK + _NODE_READ_LINES, records)
    failures = [(r["body"], res) for r, res in zip(records, results, strict=True) if res is not True]
    assert not failures


# ----------------------------------------------------------------------------- properties

_json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-MAX_SAFE, max_value=MAX_SAFE) | st.text(max_size=20)
)
json_like = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
secrets_st = st.binary(min_size=24, max_size=32).map(lambda b: "whsec_" + base64.b64encode(b).decode())
_fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(data=json_like, secret=secrets_st)
def test_property_sign_then_verify(data: Any, secret: str) -> None:
    body = dumps(data)
    h = _headers(body, [secret])
    verify(body, h, [secret])
    hex_only = {k: v for k, v in h.items() if not k.startswith("webhook-")}
    verify(body, hex_only, [secret])


@_fast
@given(data=json_like, secret=secrets_st, pick=st.data())
def test_property_any_flipped_body_byte_fails(data: Any, secret: str, pick: st.DataObject) -> None:
    body = dumps(data)
    h = _headers(body, [secret])
    i = pick.draw(st.integers(0, len(body) - 1), label="index")
    x = pick.draw(st.integers(1, 255), label="xor")
    tampered = body[:i] + bytes([body[i] ^ x]) + body[i + 1 :]
    with pytest.raises(VerificationError):
        verify(tampered, h, [secret])
    with pytest.raises(VerificationError):
        verify(tampered, {k: v for k, v in h.items() if not k.startswith("webhook-")}, [secret])


@_fast
@given(
    data=json_like,
    secret=secrets_st,
    header=st.sampled_from(["X-PerfexAPI-Signature", "X-Webhook-Signature", "webhook-signature"]),
    pick=st.data(),
)
def test_property_any_flipped_signature_byte_fails(
    data: Any, secret: str, header: str, pick: st.DataObject
) -> None:
    body = dumps(data)
    h = _headers(body, [secret])
    sig = h[header].encode("latin-1")
    i = pick.draw(st.integers(0, len(sig) - 1), label="index")
    x = pick.draw(st.integers(1, 255), label="xor")
    tampered = (sig[:i] + bytes([sig[i] ^ x]) + sig[i + 1 :]).decode("latin-1")
    if header == "webhook-signature":
        headers = {**h, header: tampered}
    else:  # the hex path is only used without Standard Webhooks headers
        headers = {header: tampered}
    with pytest.raises(VerificationError):
        verify(body, headers, [secret])


@settings(max_examples=300, deadline=None)
@given(data=json_like)
def test_property_dumps_parses_back_equal(data: Any) -> None:
    out = dumps(data)
    assert orjson.loads(out) == data
    assert json.loads(out) == data
    assert out == orjson.dumps(orjson.loads(out))  # already compact and canonical


@settings(max_examples=300, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_property_numbers_keep_their_value(value: float | int) -> None:
    back = orjson.loads(dumps([value]))[0]
    if isinstance(value, float):
        # The same double; integral ones are written without a fraction (1.0 -> 1, as JS does), which
        # Python parsers read as int.
        assert float(back) == value
    elif abs(value) > MAX_SAFE:
        assert back == str(value)
    else:
        assert back == value
