"""`perfex-webhooks`: the one console command (SPEC §4).

Errors are one line on stderr and a non-zero exit; `--json` output is machine-readable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from app import __version__
from app.config import ConfigError, Settings, load_env_file

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """A problem the user can fix: printed as one line, exit 1."""


def _errors_to_one_line(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from app.events import InvalidEvent
        from app.producer import ProduceError
        from app.topics import TopicsError

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ConfigError, InvalidEvent, ProduceError, TopicsError, ValueError, KeyError) as exc:
            raise UserError(str(exc).strip("'\"")) from exc

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="perfex-webhooks")
@click.option("--env-file", default=".env", show_default=True, help="KEY=VALUE file read if present")
def main(env_file: str) -> None:
    """Signed, reliable webhooks for Perfex CRM change events, on Kafka."""
    load_env_file(env_file)


# ---- topics -------------------------------------------------------------------------------------
@main.group()
def topics() -> None:
    """Kafka topics declared in topics.yaml."""


@topics.command("apply")
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    help="replicas of every topic (default: WEBHOOKS_REPLICATION_FACTOR, else min(3, brokers))",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="seconds to reach the broker")
@_errors_to_one_line
def topics_apply(replication_factor: int | None, timeout: float) -> None:
    """Create or reconcile topics from topics.yaml (idempotent)."""
    from app.topics import apply

    changes = apply(
        settings(),
        replication_factor=replication_factor,
        timeout=timeout,
        warn=lambda line: click.echo(line, err=True),
    )
    for line in changes:
        click.echo(line)
    click.echo(f"{len(changes)} change(s)" if changes else "topics up to date")


# ---- catalog ------------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def catalog(as_json: bool) -> None:
    """List the event catalog."""
    from app.catalog import load_catalog

    cat = load_catalog()
    if as_json:
        print_json(cat.as_dict())
        return
    for res, desc in cat.resources.items():
        click.secho(f"{res}  ", bold=True, nl=False)
        click.echo(desc)
        for ev in cat.events.values():
            if ev.resource == res:
                mark = "*" if ev.documented else " "
                click.echo(f"  {mark} {ev.name:<34} {ev.description}")
    documented = sum(e.documented for e in cat.events.values())
    click.echo(f"\n{len(cat.resources)} resources, {len(cat.events)} events ({documented} documented: *)")


# ---- emit ---------------------------------------------------------------------------------------
def _json_arg(text: str | None, what: str) -> dict[str, Any] | None:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{what}: cannot read {text[1:]}: {exc.strerror}") from exc
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise UserError(f"{what}: must be a JSON object")
    return value


@main.command()
@click.argument("event")
@click.option("--resource-id", required=True, help="id of the CRM record")
@click.option("--data", help="the full resource as JSON, or @file")
@click.option("--previous", help="changed fields' old values as JSON, or @file")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def emit(event: str, resource_id: str, data: str | None, previous: str | None, as_json: bool) -> None:
    """Produce one change event to crm.events."""
    from app.producer import Producer

    with Producer(settings()) as p:
        value = p.emit(
            event, resource_id, _json_arg(data, "--data"), _json_arg(previous, "--previous"), flush=False
        )
    if as_json:
        print_json(value)
    else:
        click.echo(value["id"])


# ---- worker -------------------------------------------------------------------------------------
@main.command()
@click.option("--loglevel", default="info", show_default=True)
@click.option("--web-port", type=int, help="override WEBHOOKS_WEB_PORT")
@click.option(
    "--apply-topics/--no-apply-topics",
    default=True,
    show_default=True,
    help="create missing topics from topics.yaml before starting",
)
@_errors_to_one_line
def worker(loglevel: str, web_port: int | None, apply_topics: bool) -> None:
    """Run a worker: fan-out, delivery, retry tiers, admin web, /metrics."""
    import dataclasses

    s = settings()
    if web_port is not None:
        s = dataclasses.replace(s, web_port=web_port)
    if not s.admin_token and not s.admin_insecure:
        raise UserError(
            "WEBHOOKS_ADMIN_TOKEN is not set; set it (`openssl rand -hex 32`), or "
            "WEBHOOKS_ADMIN_INSECURE=true for a local worker whose admin API listens on loopback only"
        )
    s.check_serving()  # weak or placeholder tokens, a non-loopback host in insecure mode, a bad key
    from app.topics import apply, check_live_sizes, resolve_replication
    from app.worker import run_worker  # after the checks: Faust takes seconds to import

    if apply_topics:
        for line in apply(s, warn=lambda line: click.echo(line, err=True)):
            click.echo(line, err=True)
    check_live_sizes(s)  # topics too small for WEBHOOKS_MAX_EVENT_BYTES: refuse to start
    # Faust creates its own topics only when missing (apply declares them); same factor either way.
    s = dataclasses.replace(s, replication_factor=resolve_replication(s))
    run_worker(s, loglevel=loglevel)


# ---- endpoints ----------------------------------------------------------------------------------
@main.group()
def endpoints() -> None:
    """Manage webhook endpoints (stored in the webhooks.endpoints topic)."""


def _write_endpoint(s: Settings, ep: Any, delete: bool = False) -> None:
    from app.endpoints import TOPIC
    from app.producer import Producer
    from app.secretbox import box_for

    with Producer(s) as p:
        p.send(TOPIC, ep.id, None if delete else ep.record(box_for(s.secrets_key)))


def _print_endpoint(ep_public: dict[str, Any]) -> None:
    state = (
        "enabled"
        if ep_public["enabled"]
        else f"disabled ({ep_public.get('disabled_reason') or 'by operator'})"
    )
    click.echo(f"{ep_public['id']}  {ep_public['mode']:<9} {state}")
    click.echo(f"  format: {ep_public.get('format', 'perfexapi')}")
    click.echo(f"  url:    {ep_public['url']}")
    click.echo(f"  events: {', '.join(ep_public['events'])}")
    if ep_public.get("description"):
        click.echo(f"  about:  {ep_public['description']}")
    if ep_public.get("grace_secret_active"):
        click.echo(f"  grace secret valid until {ep_public['grace_expires_at']:.0f} (unix)")


@endpoints.command("add")
@click.option("--url", required=True)
@click.option("--events", required=True, help="comma-separated names or patterns: 'invoice.*,lead.created'")
@click.option(
    "--mode", type=click.Choice(["immediate", "smart", "async"]), default="async", show_default=True
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["perfexapi", "standard"]),
    default="perfexapi",
    show_default=True,
    help="body shape: the resource under `payload`, or Standard Webhooks' {type, timestamp, data}",
)
@click.option(
    "--secret", help="your own secret (16+ printable characters) instead of a generated whsec_ one"
)
@click.option("--description", default="")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_add(
    url: str, events: str, mode: str, fmt: str, secret: str | None, description: str, as_json: bool
) -> None:
    """Register an endpoint; prints its id and (this once) its secret."""
    from app.endpoints import create_endpoint

    s = settings()
    ep = create_endpoint(
        s, url=url, events=events, mode=mode, secret=secret, description=description, format=fmt
    )
    _write_endpoint(s, ep)
    if as_json:
        print_json({**ep.public(), "secret": ep.secret})
    else:
        click.echo(f"endpoint {ep.id} created")
        click.echo(f"secret: {ep.secret}")
        click.echo("(the secret is shown only now; store it where the receiver can verify signatures)")


@endpoints.command("list")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_list(as_json: bool) -> None:
    """List endpoints (never their secrets)."""
    from app.endpoints import read_endpoints

    eps = sorted(read_endpoints(settings()).values(), key=lambda e: e.created_at)
    if as_json:
        print_json([e.public() for e in eps])
        return
    if not eps:
        click.echo("no endpoints; add one with `perfex-webhooks endpoints add`")
    for e in eps:
        state = "on " if e.enabled else "off"
        click.echo(f"{e.id}  {state} {e.mode:<9} {e.url}  [{', '.join(e.events)}]")


def _load(ep_id: str) -> tuple[Settings, Any]:
    from app.endpoints import find, read_endpoints

    s = settings()
    return s, find(read_endpoints(s), ep_id)


@endpoints.command("show")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_show(endpoint_id: str, as_json: bool) -> None:
    """Show one endpoint."""
    _, ep = _load(endpoint_id)
    if as_json:
        print_json(ep.public())
    else:
        _print_endpoint(ep.public())


def _set_enabled(endpoint_id: str, enabled: bool, as_json: bool) -> None:
    from app.endpoints import update_endpoint

    s, ep = _load(endpoint_id)
    new = update_endpoint(s, ep, {"enabled": enabled})
    if not enabled:
        new = new.changed(disabled_reason="disabled by operator")
    _write_endpoint(s, new)
    if as_json:
        print_json(new.public())
    else:
        click.echo(f"endpoint {new.id} {'enabled' if enabled else 'disabled'}")


@endpoints.command("enable")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_enable(endpoint_id: str, as_json: bool) -> None:
    """Enable an endpoint (also one disabled by a 410)."""
    _set_enabled(endpoint_id, True, as_json)


@endpoints.command("disable")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_disable(endpoint_id: str, as_json: bool) -> None:
    """Disable an endpoint: its deliveries go to the DLQ until it is enabled."""
    _set_enabled(endpoint_id, False, as_json)


@endpoints.command("delete")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_delete(endpoint_id: str, as_json: bool) -> None:
    """Delete an endpoint (a tombstone on the compacted registry topic)."""
    s, ep = _load(endpoint_id)
    _write_endpoint(s, ep, delete=True)
    if as_json:
        print_json({"id": ep.id, "deleted": True})
    else:
        click.echo(f"endpoint {ep.id} deleted")


@endpoints.command("rotate-secret")
@click.argument("endpoint_id")
@click.option(
    "--grace", default="24h", show_default=True, help="how long the old secret still signs (max 24h)"
)
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_rotate(endpoint_id: str, grace: str, as_json: bool) -> None:
    """New primary secret; the old one stays valid for --grace."""
    from app.config import parse_duration
    from app.endpoints import rotate_secret

    s, ep = _load(endpoint_id)
    new = rotate_secret(ep, parse_duration(grace, "--grace"))
    _write_endpoint(s, new)
    if as_json:
        print_json({**new.public(), "secret": new.secret})
    else:
        click.echo(f"endpoint {new.id}: new secret: {new.secret}")
        if new.grace_expires_at:
            click.echo(f"the previous secret stays valid for {grace}")


@endpoints.command("re-encrypt")
@_errors_to_one_line
def endpoints_reencrypt() -> None:
    """Rewrite every endpoint record with its secrets sealed by the newest WEBHOOKS_SECRETS_KEY key.

    Run it after putting a new key first in WEBHOOKS_SECRETS_KEY (old keys after it, comma-separated)
    or after setting a key for the first time; then the old keys can be dropped.
    """
    from app.endpoints import reencrypt_all

    n = reencrypt_all(settings())
    click.echo(f"re-encrypted {n} endpoint record(s) with the newest key")


@main.command("secrets-key")
def secrets_key() -> None:
    """Print a new random key for WEBHOOKS_SECRETS_KEY."""
    from app.secretbox import new_key

    click.echo(new_key())


# ---- dlq ----------------------------------------------------------------------------------------
@main.group()
def dlq() -> None:
    """Dead-letter queue: list and replay deliveries that exhausted their retries."""


def _time_opt(value: str | None, name: str) -> float | None:
    if not value:
        return None
    from app.events import parse_rfc3339

    try:
        return float(value) if value.replace(".", "", 1).isdigit() else parse_rfc3339(value)
    except Exception as exc:
        raise UserError(f"{name}: {value!r} is not a unix time or RFC 3339 timestamp") from exc


def _dlq_filter(endpoint: str | None, event: str | None, since: str | None, until: str | None) -> Any:
    from app.dlq import Filter

    return Filter(
        endpoint=endpoint, event=event, since=_time_opt(since, "--since"), until=_time_opt(until, "--until")
    )


@dlq.command("list")
@click.option("--endpoint", help="only this endpoint id")
@click.option("--event", help="only this event name or pattern")
@click.option("--since", help="dead at or after (unix time or RFC 3339)")
@click.option("--until", help="dead before (unix time or RFC 3339)")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def dlq_list(
    endpoint: str | None, event: str | None, since: str | None, until: str | None, as_json: bool
) -> None:
    """List DLQ entries with their history."""
    from app.dlq import read_view, select, summary
    from app.events import now_rfc3339

    try:
        entries = select(read_view(settings()), _dlq_filter(endpoint, event, since, until))
    except RuntimeError as exc:
        raise UserError(str(exc)) from exc
    if as_json:
        print_json([summary(e) for e in entries])
        return
    if not entries:
        click.echo("DLQ is empty" + (" for this filter" if endpoint or event or since or until else ""))
        return
    for e in entries:
        s = summary(e)
        click.echo(
            f"{s['delivery_id']}  {s['endpoint_id']}  {s['event']:<28} {s['reason']:<18} "
            f"attempts={s['attempts']} last={s['last_status'] or s['last_error']}  "
            f"dead_at={now_rfc3339(float(s['dead_at'] or 0))}"
        )
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@dlq.command("replay")
@click.option("--delivery-id", help="replay this one delivery")
@click.option("--all", "replay_all", is_flag=True, help="replay every entry matching the filters")
@click.option("--endpoint", help="only this endpoint id")
@click.option("--event", help="only this event name or pattern")
@click.option("--since", help="dead at or after (unix time or RFC 3339)")
@click.option("--until", help="dead before (unix time or RFC 3339)")
@click.option("--dry-run", is_flag=True, help="show what would be replayed; change nothing")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def dlq_replay(
    delivery_id: str | None,
    replay_all: bool,
    endpoint: str | None,
    event: str | None,
    since: str | None,
    until: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-publish DLQ entries to webhooks.deliveries (same delivery id) and remove them from the DLQ."""
    from rich.progress import Progress

    from app.dlq import read_view, replay, select, summary

    if bool(delivery_id) == bool(replay_all):
        raise UserError("give exactly one of --delivery-id ID or --all")
    s = settings()
    try:
        view = read_view(s)
    except RuntimeError as exc:
        raise UserError(str(exc)) from exc
    if delivery_id:
        if delivery_id not in view:
            raise UserError(f"no DLQ entry {delivery_id} (already replayed, or never dead)")
        entries = [view[delivery_id]]
    else:
        entries = select(view, _dlq_filter(endpoint, event, since, until))
    if dry_run:
        if as_json:
            print_json({"dry_run": True, "would_replay": [summary(e)["delivery_id"] for e in entries]})
        else:
            for e in entries:
                click.echo(f"would replay {e['id']}  {e.get('endpoint_id')}  {e.get('event')}")
            click.echo(f"{len(entries)} would be replayed (dry run: nothing changed)")
        return
    if len(entries) > 1 and not as_json and sys.stderr.isatty():
        with Progress(transient=True) as bar:
            task = bar.add_task("replaying", total=len(entries))
            n = replay(s, entries, progress=lambda k: bar.advance(task, k))
    else:
        n = replay(s, entries)
    if as_json:
        print_json({"replayed": n, "delivery_ids": [e["id"] for e in entries]})
    else:
        click.echo(f"replayed {n} deliver{'y' if n == 1 else 'ies'}")


if __name__ == "__main__":
    main()
