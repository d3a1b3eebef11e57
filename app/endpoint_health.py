"""The CLI's side of endpoint health (app/breaker.py holds the breaker itself): re-enabling an
endpoint with the offer to replay what was parked for it, and a breaker's state as lines of text."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.config import Settings


def enable(
    settings: Callable[[], Settings], api: Any, ep_id: str, replay: bool, if_version: int | None = None
) -> dict[str, Any]:
    """Enable `ep_id` (through the admin API client `api`, or Kafka when None) and, with `replay`,
    replay its replayable DLQ entries; the endpoint as a dict with `parked` (entries still waiting)
    and `replayed`."""
    import dataclasses

    if api is not None:
        with api:
            row = dataclasses.asdict(api.enable_endpoint(ep_id, replay=replay))
        row.pop("secret", None)
        row["replayed"] = row.get("replayed") or 0
        return row
    from app.dlq import Filter, is_replayable, read_view, select
    from app.dlq import replay as replay_entries
    from app.endpoints import check_version, find, read_endpoints, update_endpoint, write_endpoint

    s = settings()
    ep = find(read_endpoints(s), ep_id)
    check_version(ep, if_version)
    new = write_endpoint(s, ep.id, update_endpoint(s, ep, {"enabled": True})) or ep
    # The registry write is acknowledged and read back before the replay: a worker that reads a
    # replayed delivery first catches its registry view up (Dispatcher.dispatch), never re-parks it.
    parked = [e for e in select(read_view(s), Filter(endpoint=ep_id)) if is_replayable(e)]
    row = new.public()
    row["replayed"] = replay_entries(s, parked) if replay else 0
    row["parked"] = 0 if replay else len(parked)
    return row


def breaker_lines(state: dict[str, Any], now: float | None = None) -> list[str]:
    """`endpoints breaker ID` in words."""
    now = time.time() if now is None else now

    def ago(t: Any) -> str:
        return "-" if not t else f"{max(0.0, now - float(t)):.0f}s ago"

    lines = [f"{state.get('endpoint_id')}  breaker {str(state.get('state')).replace('_', '-')}"]
    if not state.get("enabled", True):
        lines.append(f"  endpoint disabled: {state.get('disabled_reason') or 'by operator'}")
    if state.get("opened_at"):
        lines.append(f"  opened {ago(state['opened_at'])}: {state.get('opened_because')}")
        lines.append(f"  deliveries held since: {state.get('held_since_opened', 0)}")
    if state.get("probe_in_flight"):
        lines.append("  a probe is testing the endpoint")
    lines.append(
        f"  consecutive failures (this worker): {state.get('consecutive_failures', 0)}; "
        f"failing since: {ago(state.get('failing_since'))}"
    )
    lines.append(f"  failure streak (all workers' attempts): {state.get('failure_streak', 0)}")
    lines.append(f"  last success: {ago(state.get('last_success'))}; last failure: {ago(state.get('last_failure'))}")
    if state.get("parked"):
        lines.append(f"  parked in the DLQ: {state['parked']} (endpoints enable ID --replay, or dlq replay)")
    return lines
