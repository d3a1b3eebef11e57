"""Prometheus metrics of a worker (served on /metrics of WEBHOOKS_WEB_PORT).

Labels stay bounded: event names and reasons come from closed sets, endpoint ids from the registry;
URLs, delivery ids and resource ids never become labels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 3, 5, 10, 30, 60, 300, 3600, 86400)

EVENTS_CONSUMED = Counter(
    "webhooks_events_consumed_total",
    "Valid change events consumed from crm.events",
    ["event"],
    registry=REGISTRY,
)
INVALID_EVENTS = Counter(
    "webhooks_invalid_events_total",
    "Records parked on crm.events.invalid, by reason",
    ["reason"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "webhooks_deliveries_total",
    "Delivery attempts by endpoint, mode and outcome (success, http_error, timeout, connect_error, ...)",
    ["endpoint", "mode", "outcome"],
    registry=REGISTRY,
)
ATTEMPT_LATENCY = Histogram(
    "webhooks_attempt_duration_seconds",
    "HTTP attempt latency",
    ["mode"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "webhooks_end_to_end_seconds",
    "Event occurred_at to 2xx received, by mode",
    ["mode"],
    buckets=_E2E_BUCKETS,
    registry=REGISTRY,
)
RETRIES_SCHEDULED = Counter(
    "webhooks_retries_scheduled_total", "Deliveries moved into a retry tier", ["tier"], registry=REGISTRY
)
DLQ_ENTRIES = Counter(
    "webhooks_dlq_entries_total",
    "Deliveries parked in the dead-letter topic, by reason",
    ["reason"],
    registry=REGISTRY,
)
POISON = Counter(
    "webhooks_poison_records_total",
    "Records parked in the DLQ (reason poison) because they could not be decoded, validated or "
    "handled, by source topic and error class",
    ["topic", "error"],
    registry=REGISTRY,
)
DUPLICATES_SKIPPED = Counter(
    "webhooks_duplicates_skipped_total",
    "Deliveries read again (after a crash or rebalance) and skipped: their success is already recorded",
    registry=REGISTRY,
)
DLQ_SIZE = Gauge("webhooks_dlq_size", "Deliveries currently in the DLQ view", registry=REGISTRY)
REPLAYS = Counter("webhooks_replays_total", "DLQ entries replayed", registry=REGISTRY)
SMART_COLLAPSED = Counter(
    "webhooks_smart_collapsed_events_total", "Events merged into smart deliveries", registry=REGISTRY
)
SMART_DELIVERIES = Counter(
    "webhooks_smart_deliveries_total", "Smart deliveries released after debounce", registry=REGISTRY
)
SMART_PENDING = Gauge(
    "webhooks_smart_pending", "Smart (endpoint, resource) items waiting for their window", registry=REGISTRY
)
IN_FLIGHT = Gauge("webhooks_in_flight_requests", "HTTP requests in flight", registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "webhooks_consumer_lag", "Records behind the end of each consumed topic", ["topic"], registry=REGISTRY
)
ENDPOINTS = Gauge("webhooks_endpoints", "Registered endpoints by state", ["state"], registry=REGISTRY)
ENDPOINTS_DISABLED_BY_410 = Counter(
    "webhooks_endpoints_disabled_total", "Endpoints disabled by a 410 Gone", registry=REGISTRY
)
FILTERED_OUT = Counter(
    "webhooks_deliveries_filtered_out_total",
    "Events an endpoint subscribes to that its content filter left out (no delivery made)",
    ["endpoint"],
    registry=REGISTRY,
)
FILTER_ERRORS = Counter(
    "webhooks_filter_errors_total",
    "Filter evaluations that failed (counted as no match for that endpoint only)",
    ["endpoint"],
    registry=REGISTRY,
)
THROTTLED = Counter(
    "webhooks_deliveries_throttled_total",
    "Deliveries over their endpoint's max_rate, put back into a retry tier until their slot",
    ["endpoint"],
    registry=REGISTRY,
)
ORDERING_HELD = Counter(
    "webhooks_ordering_held_total",
    "Deliveries held for ordering: appended to webhooks.ordering.held behind a failing delivery of "
    "the same resource (endpoints with ordering: resource)",
    ["endpoint"],
    registry=REGISTRY,
)
ORDERING_RELEASED = Counter(
    "webhooks_ordering_released_total",
    "Held deliveries released (read back in order once the delivery ahead of them was delivered or parked)",
    registry=REGISTRY,
)
ORDERING_BLOCKED = Gauge(
    "webhooks_ordering_blocked_sequences",
    "(endpoint, resource) sequences of this worker's partitions blocked behind a delivery in the retry tiers",
    registry=REGISTRY,
)

# Endpoint health (app/breaker.py). The breaker is per worker: dashboards take `max by (endpoint)`.
BREAKER_STATE = Gauge(
    "webhooks_breaker_state",
    "This worker's circuit breaker per endpoint: 0 closed, 1 half-open (a probe is testing it), 2 open",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINTS_AUTO_DISABLED = Counter(
    "webhooks_endpoints_auto_disabled_total",
    "Endpoints disabled because they failed continuously for WEBHOOKS_AUTO_DISABLE_AFTER",
    registry=REGISTRY,
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, memoised: labels() validates and locks on every call, and the
    delivery hot path asks for the same few children thousands of times a second."""
    key = (id(metric), values)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*values)
    return c


_BY_ENDPOINT = (DELIVERIES, BREAKER_STATE, FILTERED_OUT, FILTER_ERRORS, THROTTLED, ORDERING_HELD)  # every metric with an `endpoint` label


def forget_endpoints(keep: set[str]) -> int:
    """Remove the label children of endpoints not in `keep` (deleted ones), so their series end
    instead of being exported forever; returns how many children went."""
    removed = 0
    for metric in _BY_ENDPOINT:
        pos = metric._labelnames.index("endpoint")
        stale = [values for values in list(metric._metrics) if values[pos] not in keep]
        for values in stale:
            _children.pop((id(metric), values), None)
            try:
                metric.remove(*values)
            except KeyError:  # removed meanwhile by another scrape
                continue
            removed += 1
    return removed
