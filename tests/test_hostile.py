"""Hostile input on `crm.events` (SPEC §3.1): whatever arrives, it is parked with its reason, the
worker keeps running and good events around it are delivered. Plus properties of the input gate
(`app.events.parse_event`); the signer/verify properties live in tests/test_signing.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.catalog import load_catalog
from app.events import REASONS, ChangeEvent, InvalidEvent, build_event, now_rfc3339, parse_event

CATALOG = load_catalog()
EVENT_NAMES = sorted(CATALOG.events)
_props = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_invalid(key: bytes | None, value: bytes | None, **kw: Any) -> ChangeEvent | InvalidEvent:
    """parse_event's whole contract: a ChangeEvent, or InvalidEvent with a known reason."""
    try:
        return parse_event(key, value, **kw)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return exc


# ---- properties of the envelope parser -----------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
perfex_data = st.dictionaries(
    st.text(min_size=1, max_size=12), st.none() | st.text(max_size=40), min_size=0, max_size=8
)
resource_ids = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() != "")
timestamps = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@_props
@given(key=st.none() | st.binary(max_size=40), value=st.none() | st.binary(max_size=400))
def test_property_arbitrary_bytes_only_ever_raise_invalid_event(
    key: bytes | None, value: bytes | None
) -> None:
    _parse_or_invalid(key, value)


@_props
@given(
    event=st.sampled_from(EVENT_NAMES),
    changes=st.dictionaries(
        st.sampled_from(["id", "event", "occurred_at", "resource_id", "data", "previous", "extra"]),
        json_values | st.text(max_size=40) | st.sampled_from(["", "0001-01-01T00:00:00+23:59", "Z"]),
        max_size=3,
    ),
    drop=st.lists(st.sampled_from(["id", "event", "occurred_at", "resource_id", "data"]), max_size=2),
    key=st.none() | st.binary(max_size=30) | st.just(b"invoice:1"),
)
def test_property_mutated_envelopes_only_ever_raise_invalid_event(
    event: str, changes: dict[str, Any], drop: list[str], key: bytes | None
) -> None:
    """Near-valid JSON objects (a field retyped, removed or added) reach every branch of the gate."""
    _k, value = build_event(event, "1", {"id": "1"})
    value.update(changes)
    for f in drop:
        value.pop(f, None)
    out = _parse_or_invalid(key, orjson.dumps(value))
    if isinstance(out, ChangeEvent):
        assert out.event in CATALOG and key == out.key.encode()


@_props
@given(value=st.binary(min_size=101, max_size=300))
def test_property_oversized_is_too_large_whatever_it_holds(value: bytes) -> None:
    with pytest.raises(InvalidEvent) as exc:
        parse_event(b"invoice:1", value, max_bytes=100)
    assert exc.value.reason == "too_large"


@_props
@given(
    event=st.sampled_from(EVENT_NAMES),
    rid=resource_ids,
    data=perfex_data,
    previous=st.none() | perfex_data,
    when=timestamps,
)
def test_property_valid_envelopes_round_trip(
    event: str, rid: str, data: dict[str, Any], previous: dict[str, Any] | None, when: datetime
) -> None:
    key, value = build_event(event, rid, data, previous, occurred_at=now_rfc3339(when.timestamp()))
    ev = parse_event(key.encode(), orjson.dumps(value))
    assert ev.id == value["id"] and ev.event == event and ev.occurred_at == value["occurred_at"]
    assert ev.resource == CATALOG.resource_of(event) and ev.resource_id == value["resource_id"]
    assert ev.key == key and ev.data == data and ev.previous == previous
    assert abs(ev.occurred_ts - when.timestamp()) < 0.001  # the envelope keeps milliseconds
    # And once more through its own re-serialisation: parsing is stable.
    again = parse_event(key.encode(), orjson.dumps(value))
    assert again == ev


# ---- the corpus, through a real worker ---------------------------------------------------------------
def _envelope(event: str = "invoice.updated", rid: str = "1", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": f"evt_hostile_{rid}",
        "event": event,
        "occurred_at": "2026-11-27T10:00:00.123Z",
        "resource_id": rid,
        "data": {"id": rid, "status": "2"},
    }
    doc.update(over)
    return doc


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def corpus(max_event_bytes: int) -> list[tuple[bytes | None, bytes | None, str, str]]:
    """(key, value, expected reason, label) for every kind of bad input we promise to park."""
    good = orjson.dumps(_envelope(rid="c1"))
    big = orjson.dumps(_envelope(rid="c8", data={"id": "c8", "blob": "x" * 1_500_000}))
    assert max_event_bytes < len(big) < 2 * 1024 * 1024  # over our limit, under the topic's
    deep_data = (
        b'{"id":"e","event":"invoice.updated","occurred_at":"2026-11-27T10:00:00Z","resource_id":"c10",'
        b'"data":{"x":' + _nested(100) + b"}}"
    )
    # Valid and under the limit as sent, but 1e5 re-encodes as 100000.0: the delivery records built
    # from it (deliveries, retry tiers, DLQ) would outgrow every topic's limit.
    floats = orjson.dumps(_envelope(rid="c18", data={"id": "c18", "x": [0] * 237_000})).replace(
        b"0,", b"1e5,"
    )
    assert len(floats) < max_event_bytes
    deeper = deep_data.replace(_nested(100), _nested(5000)).replace(b'"c10"', b'"c11"')
    return [
        (b"invoice:c0", b"{not json", "not_json", "not JSON"),
        (b"invoice:c1", good[: len(good) // 2], "not_json", "truncated JSON"),
        (b"invoice:c2", good.replace(b'"status":"2"', b'"status":"\xff\xfe"'), "not_utf8", "invalid UTF-8"),
        (
            b"invoice:c3",
            orjson.dumps(_envelope(rid="c3", data="not an object")),
            "wrong_type",
            "data a string",
        ),
        (b"invoice:c4", orjson.dumps(_envelope(rid="c4", id=["x"])), "wrong_type", "id a list"),
        (
            b"invoice:c5",
            orjson.dumps(_envelope(rid="c5", event="invoice.nosuch")),
            "unknown_event",
            "unknown event",
        ),
        (
            b"invoice:c6",
            orjson.dumps({k: v for k, v in _envelope(rid="c6").items() if k != "id"}),
            "missing_field",
            "missing id",
        ),
        (None, orjson.dumps(_envelope(rid="c7")), "missing_key", "null key"),
        (b"invoice:c8", big, "too_large", "1.5 MB payload"),
        # Control characters become 6-byte \u escapes when the worker quotes the value: the
        # parked record must still fit crm.events.invalid.
        (b"invoice:c9", b"\x01" * 1_500_000, "too_large", "1.5 MB of control characters"),
        (b"invoice:c10", deep_data, "too_deep", "100 levels of nesting"),
        (b"invoice:c11", deeper, "too_deep", "5000 levels of nesting"),
        (b"invoice:c12", orjson.dumps([_envelope(rid="c12")]), "not_object", "JSON array"),
        (b"invoice:c13", b"", "not_json", "empty value"),
        (b"invoice:c14", None, "not_json", "null value (tombstone)"),
        (b"lead:c15", orjson.dumps(_envelope(rid="c15")), "key_mismatch", "key of another resource"),
        (
            b"invoice:c16",
            orjson.dumps(_envelope(rid="c16", occurred_at="yesterday")),
            "bad_timestamp",
            "bad time",
        ),
        (b"invoice:c17", b"\x00" * 900_000, "not_json", "900 kB of NUL bytes under the limit"),
        (b"invoice:c18", floats, "too_large", "950 kB of 1e5 that re-encodes to 2 MB"),
    ]


def _raw_producer(bootstrap: str):
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",  # SPEC §3.1: agree with the workers' partitioner
            "message.max.bytes": 4 * 1024 * 1024,
            "enable.idempotence": True,
        }
    )


@pytest.mark.kafka
def test_hostile_corpus_is_parked_with_reasons_and_the_worker_keeps_going(
    settings, receiver, workers
) -> None:
    import httpx

    from tests.helpers import read_all, register

    register(settings, receiver, "/good", "invoice.*", "immediate")
    register(settings, receiver, "/good-async", "invoice.*", "async")
    w = workers()
    assert w.proc is not None
    pid = w.proc.pid
    cases = corpus(settings.max_event_bytes)
    p = _raw_producer(settings.bootstrap_servers)
    topic = settings.topic("crm.events")
    errors: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    good_ids = []
    for i, (key, value, _reason, _label) in enumerate([*cases, (None, None, "", "")]):
        gkey, gval = build_event("invoice.created", f"g{i}", {"id": f"g{i}"})
        good_ids.append(gval["id"])
        p.produce(topic, key=gkey.encode(), value=orjson.dumps(gval), on_delivery=report)
        if i < len(cases):
            p.produce(topic, key=key, value=value, on_delivery=report)
    assert p.flush(30) == 0 and not errors, errors

    for path in ("/good", "/good-async"):
        got = receiver.wait_for(len(good_ids), path, timeout=60)
        assert sorted(r.json["event_id"] for r in got) == sorted(good_ids), path

    parked = read_all(settings, "crm.events.invalid", len(cases), timeout=30)
    by_key: dict[bytes | None, dict[str, Any]] = {m.key(): orjson.loads(m.value()) for m in parked}
    missing = [label for key, _v, _r, label in cases if key not in by_key]
    assert not missing, f"not parked: {missing}"
    for key, value, reason, label in cases:
        rec = by_key[key]
        assert rec["reason"] == reason, f"{label}: {rec['reason']} ({rec['detail']})"
        assert rec["detail"] and rec["size"] == (0 if value is None else len(value)), label
    assert len(parked) == len(cases)

    # Same process, still ready, still consuming: nothing restarted it.
    assert w.proc is not None and w.proc.pid == pid and w.proc.poll() is None
    assert httpx.get(w.base + "/ready", timeout=5).status_code == 200
    # ... and no agent crashed and was restarted by Faust's supervisor inside it.
    log_text = w.log_path.read_text(errors="replace")
    assert "Crashed reason" not in log_text and "fan-out failed" not in log_text
    metrics = w.metrics()
    for reason in {r for _k, _v, r, _l in cases}:
        n = sum(1 for _k, _v, r, _l in cases if r == reason)
        assert f'webhooks_invalid_events_total{{reason="{reason}"}} {float(n)}' in metrics, reason
    key, value = build_event("invoice.paid", "after", {"id": "after"})
    p.produce(topic, key=key.encode(), value=orjson.dumps(value))
    p.flush(10)
    deadline = time.monotonic() + 30
    while {r.path for r in receiver.received() if r.json["event_id"] == value["id"]} != {
        "/good",
        "/good-async",
    }:
        assert time.monotonic() < deadline, "an event after the corpus was not delivered"
        time.sleep(0.05)


@_props
@given(
    data=st.dictionaries(
        st.text(max_size=5),
        st.sampled_from([b"1e15", b"-1e15", b"1E5", b"0.1", b"1", b'"s"', b"null", b"1e-7", b"123456789"]),
        max_size=40,
    ),
    limit=st.integers(min_value=150, max_value=1200),
)
def test_property_accepted_events_re_encode_within_the_limit(data: dict[str, bytes], limit: int) -> None:
    """Whatever the gate accepts fits the limit as we will write it (delivery records, tiers, DLQ)."""
    _k, value = build_event("invoice.paid", "1", {"id": "1"}, event_id="evt_1")
    raw = orjson.dumps(value).replace(
        b'"data":{"id":"1"}',
        b'"data":{' + b",".join(orjson.dumps(k) + b":" + v for k, v in data.items()) + b"}",
    )
    out = _parse_or_invalid(b"invoice:1", raw, max_bytes=limit)
    if isinstance(out, ChangeEvent):
        assert len(orjson.dumps({**value, "data": out.data})) <= limit
