"""Content filters: which of an endpoint's subscribed events it actually gets (issue 18).

A filter is a MongoDB-like document over dotted paths of the delivery body (`payload.status`,
`event`, `previous.status`; `data.status`, `type` for `standard`-format endpoints):

    {"event": "invoice.paid", "payload.status": {"$in": ["2", "3"]}, "payload.total": {"$gte": 100}}

- a plain value is equality; `$eq`, `$ne`, `$in`, `$nin`, `$exists`, `$gt`, `$gte`, `$lt`, `$lte`;
- several paths, or several operators on one path, must all hold (implicit AND); `$and` / `$or`
  take a list of such documents;
- Perfex sends numbers as strings ("2", "10.50"): equality, `$in` and the comparisons compare as
  numbers when both sides read as numbers ("2" == 2, "10.50" > 9), else as strings (both strings).

`compile_filter` validates (ValueError naming the bad operator or path: the API's 400, the CLI's
error) and compiles once; the compiled `Filter` is kept on the endpoint (`Endpoint.matcher`) and run
once per (event, endpoint) by the fan-out (`passes`), before any delivery is made, so a filtered
event costs no delivery record, attempt or retry. A comparison that cannot be made (a number
against an object) raises `FilterError`: the fan-out counts it as no match for that endpoint only,
logs it and counts it in `webhooks_filter_errors_total`; every other subscriber still gets the event.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from app import metrics

log = logging.getLogger(__name__)

MAX_DEPTH = 8  # nesting of $and/$or
MAX_NODES = 200  # conditions in one filter: it runs for every event of the endpoint
_PATH = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}")
_MISSING = object()
_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*")

Test = Callable[[dict[str, Any]], bool]


class FilterError(Exception):
    """A filter that cannot be evaluated on this body (e.g. `$gt` against an object)."""


def _number(v: Any) -> float | None:
    """`v` as a number: ints, floats and numeric strings ("2", "10.50"); None otherwise."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str) and len(v) < 64 and _NUMBER.fullmatch(v):
        return float(v)
    return None


def _equal(a: Any, b: Any) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return bool(a == b) and type(a) is type(b)


def _ordered(value: Any, bound: Any, op: str) -> bool:
    """`value op bound` for $gt/$gte/$lt/$lte; a missing or null value never matches."""
    if value is _MISSING or value is None:
        return False
    nv, nb = _number(value), _number(bound)
    if nv is not None and nb is not None:
        a, b = nv, nb
    elif isinstance(value, str) and isinstance(bound, str):
        a, b = value, bound  # type: ignore[assignment]
    elif isinstance(value, (str, int, float, bool)):
        return False  # a scalar of another kind ("abc" against 5): no match, as in MongoDB
    else:  # an object or a list where the filter expects a value: the filter does not fit the data
        raise FilterError(f"{op}: cannot compare {type(value).__name__} with {type(bound).__name__}")
    if op == "$gt":
        return a > b
    if op == "$gte":
        return a >= b
    if op == "$lt":
        return a < b
    return a <= b


def _get(doc: Any, parts: tuple[str, ...]) -> Any:
    for p in parts:
        if isinstance(doc, dict):
            doc = doc.get(p, _MISSING)
        elif isinstance(doc, list) and p.isdigit() and int(p) < len(doc):
            doc = doc[int(p)]
        else:
            return _MISSING
        if doc is _MISSING:
            return _MISSING
    return doc


def _scalar(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise ValueError(f"filter: {where}: expected a string, number, boolean or null")


class _Compiler:
    def __init__(self) -> None:
        self.nodes = 0

    def doc(self, spec: Any, where: str, depth: int) -> Test:
        if not isinstance(spec, dict):
            raise ValueError(f"filter: {where + ': ' if where else ''}expected an object of path: condition")
        if depth > MAX_DEPTH:
            raise ValueError(f"filter: {where + ': ' if where else ''}nested deeper than {MAX_DEPTH}")
        tests: list[Test] = []
        for key, cond in spec.items():
            if not isinstance(key, str):
                raise ValueError("filter: keys must be strings")
            if key in ("$and", "$or"):
                if not isinstance(cond, list) or not cond:
                    raise ValueError(f"filter: {key}: expected a non-empty list of filters")
                parts = [self.doc(c, f"{key}[{i}]", depth + 1) for i, c in enumerate(cond)]
                tests.append(_all(parts) if key == "$and" else _any(parts))
            elif key.startswith("$"):
                raise ValueError(f"filter: unknown operator {key} at the top level (paths, $and, $or)")
            elif not _PATH.fullmatch(key):
                raise ValueError(f"filter: bad path {key!r}: dotted names such as payload.status")
            else:
                tests.append(self.path(key, cond))
        return _all(tests)

    def path(self, path: str, cond: Any) -> Test:
        parts = tuple(path.split("."))
        if not (
            isinstance(cond, dict) and cond and all(isinstance(k, str) and k.startswith("$") for k in cond)
        ):
            if isinstance(cond, dict) and any(isinstance(k, str) and k.startswith("$") for k in cond):
                raise ValueError(f"filter: {path}: do not mix operators and plain keys")
            self._count(path)
            want = _scalar(cond, path)
            return lambda d: _equal(_get(d, parts), want)
        tests = [self.op(path, parts, op, arg) for op, arg in cond.items()]
        return _all(tests)

    def op(self, path: str, parts: tuple[str, ...], op: str, arg: Any) -> Test:
        self._count(path)
        where = f"{path}.{op}"
        if op in ("$eq", "$ne"):
            want = _scalar(arg, where)
            if op == "$eq":
                return lambda d: _equal(_get(d, parts), want)
            return lambda d: not _equal(_get(d, parts), want)
        if op in ("$in", "$nin"):
            if not isinstance(arg, list) or len(arg) > 1000:
                raise ValueError(f"filter: {where}: expected a list (at most 1000 values)")
            values = [_scalar(v, where) for v in arg]
            if op == "$in":
                return lambda d: any(_equal(_get(d, parts), v) for v in values)
            return lambda d: not any(_equal(_get(d, parts), v) for v in values)
        if op == "$exists":
            if not isinstance(arg, bool):
                raise ValueError(f"filter: {where}: expected true or false")
            return lambda d: (_get(d, parts) is not _MISSING) is arg
        if op in ("$gt", "$gte", "$lt", "$lte"):
            if _number(arg) is None and not isinstance(arg, str):
                raise ValueError(f"filter: {where}: expected a number or a string")
            return lambda d: _ordered(_get(d, parts), arg, op)
        raise ValueError(
            f"filter: unknown operator {op} at {path} "
            "(use $eq, $ne, $in, $nin, $exists, $gt, $gte, $lt, $lte)"
        )

    def _count(self, where: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"filter: more than {MAX_NODES} conditions (at {where})")


def _all(tests: list[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    return lambda d: all(t(d) for t in tests)


def _any(tests: list[Test]) -> Test:
    return lambda d: any(t(d) for t in tests)


class Filter:
    """A compiled filter: `matches(body)` is True, False, or raises FilterError."""

    __slots__ = ("_test", "spec")

    def __init__(self, spec: dict[str, Any], test: Test) -> None:
        self.spec = spec
        self._test = test

    def matches(self, body: dict[str, Any]) -> bool:
        return self._test(body)


def compile_filter(spec: Any) -> Filter:
    """Validate and compile; ValueError names the operator or path at fault."""
    return Filter(spec, _Compiler().doc(spec, "", 0))


def validate(spec: Any) -> dict[str, Any] | None:
    """A filter as stored on an endpoint: None or {} (no filter) or a valid filter document."""
    if spec is None or spec == {}:
        return None
    compile_filter(spec)
    return spec


def body_for(
    data: dict[str, Any],
    previous: dict[str, Any] | None,
    event: str,
    event_id: str,
    occurred_at: str,
    fmt: str,
) -> dict[str, Any]:
    """What a filter reads: the delivery body of the endpoint's format without per-delivery fields
    (id, timestamp), the same for every endpoint of one format (`Delivery.body`)."""
    if fmt == "standard":
        return {"type": event, "timestamp": occurred_at, "data": data}
    doc: dict[str, Any] = {"event": event, "event_id": event_id, "occurred_at": occurred_at, "payload": data}
    if previous is not None:
        doc["previous"] = previous
    return doc


_last_log: dict[str, float] = {}


def passes(ep: Any, ev: Any, bodies: dict[str, dict[str, Any]]) -> bool:
    """Whether endpoint `ep` gets change event `ev` (True without a filter; typed Any: app.endpoints
    imports this module). `bodies` caches the filtered body per format
    for one event. A filter that fails (it raises, or it cannot be compiled: a record written by a
    newer version) is no match for this endpoint only: logged (once a minute per endpoint) and
    counted; a filter that leaves the event out is counted too."""
    if ep.filter is None:
        return True
    try:
        body = bodies.get(ep.format)
        if body is None:
            body = bodies[ep.format] = body_for(
                ev.data, ev.previous, ev.event, ev.id, ev.occurred_at, ep.format
            )
        flt = ep.matcher
        if flt is None or flt.matches(body):
            return True
    except Exception as exc:  # whatever a filter raises stays with its endpoint
        metrics.child(metrics.FILTER_ERRORS, ep.id).inc()
        now = time.monotonic()
        if now - _last_log.get(ep.id, -1e9) >= 60:
            _last_log[ep.id] = now
            log.warning("endpoint %s: filter failed on %s (%s); counted as no match", ep.id, ev.event, exc)
        return False
    metrics.child(metrics.FILTERED_OUT, ep.id).inc()
    return False
