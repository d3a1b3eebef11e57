"""/metrics of a real worker under a mixed load: bounded labels, DLQ size, consumer lag, per-mode series.

`register_load_endpoints` and `produce_load` (tests/helpers.py) are shared with tests/test_dashboards.py, which needs
the same kinds of traffic (success in every mode, smart bursts, failures into retry tiers and the
DLQ, invalid input) so that every dashboard panel has data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from app.config import Settings
from app.dlq import read_view
from app.producer import Producer
from tests.helpers import Load, metric_value, parse_metrics, produce_load, register_load_endpoints
from tests.receiver import Receiver
from tests.workers import WorkerProcess

pytestmark = pytest.mark.kafka

ALLOWED_LABELS = {"event", "reason", "endpoint", "mode", "outcome", "tier", "topic", "state", "le"}


def wait_metrics(
    w: WorkerProcess, cond: Callable[[list[tuple[str, dict[str, str], float]]], bool], timeout: float = 30.0
) -> list[tuple[str, dict[str, str], float]]:
    deadline = time.monotonic() + timeout
    while True:
        samples = parse_metrics(w.metrics())
        if cond(samples):
            return samples
        if time.monotonic() > deadline:
            got = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples if "bucket" not in n}
            raise AssertionError(f"metrics condition not met within {timeout:.0f}s; last scrape: {got}")
        time.sleep(0.1)


def label_problems(samples: list[tuple[str, dict[str, str], float]], load: Load) -> list[str]:
    """Label values that are URLs, delivery/event ids or resource keys/ids: unbounded, or leaks."""
    resource_key = re.compile(r"^[a-z_]+:[^ ]+$")
    bad = []
    for name, labels, _ in samples:
        for k, v in labels.items():
            if k not in ALLOWED_LABELS:
                bad.append(f"{name}: unexpected label {k}={v!r}")
            if (
                "://" in v
                or v.startswith(("dlv_", "evt_", "127.", "localhost", "whsec_"))
                or resource_key.match(v)
                or any(rid in v for rid in load.resource_ids)
            ):
                bad.append(f"{name}: label {k}={v!r}")
    return bad


def test_metrics_under_load(settings: Settings, receiver: Receiver, workers) -> None:
    # Tiers 1-2 are quick; tier 3 holds the failed leads for a minute, so its lag is visible.
    eps = register_load_endpoints(settings, receiver)
    w = workers(
        WEBHOOKS_RETRY_SCHEDULE="200ms,200ms,60s",
        WEBHOOKS_SMART_WINDOW="300ms",
        WEBHOOKS_SMART_MAX_WAIT="10s",
    )
    load = produce_load(settings, eps)
    n_invoice_events, n_leads = 12, 3
    receiver.wait_for(load.events, "/immediate", timeout=30)
    receiver.wait_for(load.events, "/async", timeout=30)
    receiver.wait_for(3, "/smart", timeout=30)  # one per invoice burst
    receiver.wait_for(3 * n_leads, "/fail", timeout=30)  # first attempt + tiers 1 and 2

    def settled(s: list[tuple[str, dict[str, str], float]]) -> bool:
        return (
            metric_value(s, "webhooks_dlq_size") == 1  # the 410 one
            and metric_value(s, "webhooks_consumer_lag", topic="webhooks.retry.5m") == n_leads
            and metric_value(s, "webhooks_consumer_lag", topic="crm.events") == 0
            and metric_value(s, "webhooks_consumer_lag", topic="webhooks.deliveries") == 0
            and metric_value(s, "webhooks_retries_scheduled_total", tier="5m") == n_leads
            and metric_value(s, "webhooks_smart_pending") == 0
        )

    s = wait_metrics(w, settled)
    assert label_problems(s, load) == []

    assert metric_value(s, "webhooks_events_consumed_total", event="invoice.updated") == n_invoice_events
    assert metric_value(s, "webhooks_events_consumed_total", event="lead.created") == n_leads
    assert metric_value(s, "webhooks_events_consumed_total", event="lead.deleted") == 1
    assert metric_value(s, "webhooks_invalid_events_total", reason="not_json") == 1
    assert metric_value(s, "webhooks_invalid_events_total") == load.invalid
    ok = eps["immediate"].id
    assert metric_value(s, "webhooks_deliveries_total", endpoint=ok, outcome="success") == load.events
    assert metric_value(s, "webhooks_deliveries_total", endpoint=eps["fail"].id, outcome="http_error") == 3 * n_leads
    assert metric_value(s, "webhooks_deliveries_total", endpoint=eps["gone"].id, outcome="gone") == 1
    for mode in ("immediate", "async", "smart"):
        assert (metric_value(s, "webhooks_end_to_end_seconds_count", mode=mode) or 0) > 0, mode
        assert (metric_value(s, "webhooks_attempt_duration_seconds_count", mode=mode) or 0) > 0, mode
    assert metric_value(s, "webhooks_retries_scheduled_total", tier="30s") == n_leads
    assert metric_value(s, "webhooks_retries_scheduled_total", tier="1m") == n_leads
    assert metric_value(s, "webhooks_dlq_entries_total", reason="gone") == 1
    assert metric_value(s, "webhooks_smart_deliveries_total") == 3
    assert metric_value(s, "webhooks_smart_collapsed_events_total") == n_invoice_events
    assert metric_value(s, "webhooks_in_flight_requests") == 0
    assert metric_value(s, "webhooks_endpoints", state="disabled") == 1

    # The DLQ gauge follows the topic: a replay's tombstone takes the entry out of the count.
    view = read_view(settings)
    assert len(view) == 1
    with Producer(settings) as p:
        p.send("webhooks.dlq", next(iter(view)), None)
    wait_metrics(w, lambda s: metric_value(s, "webhooks_dlq_size") == 0)


def test_label_check_catches_leaks() -> None:
    load = Load({}, ["inv42"], 0, 0)
    leaks = [
        ("webhooks_deliveries_total", {"endpoint": "https://hooks.example/x"}, 1.0),
        ("webhooks_deliveries_total", {"endpoint": "dlv_abc"}, 1.0),
        ("webhooks_events_consumed_total", {"event": "invoice:19"}, 1.0),
        ("webhooks_events_consumed_total", {"event": "x-inv42"}, 1.0),
        ("webhooks_events_consumed_total", {"resource": "19"}, 1.0),
    ]
    assert len(label_problems(leaks, load)) == len(leaks)
    fine = [
        ("webhooks_deliveries_total", {"endpoint": "ep_0123", "mode": "smart", "outcome": "success"}, 1.0)
    ]
    assert label_problems(fine, load) == []
