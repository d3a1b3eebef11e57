"""`perfex-webhooks`: the one console command (SPEC §4).

Errors are one line on stderr and a non-zero exit; `--json` output is machine-readable.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
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
        from app.client import ClientError
        from app.endpoints import StaleWrite
        from app.events import InvalidEvent
        from app.producer import ProduceError
        from app.topics import TopicsError

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ClientError as exc:
            raise UserError(exc.message) from exc
        except (ConfigError, InvalidEvent, ProduceError, TopicsError, ValueError, KeyError, StaleWrite) as exc:
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
@click.option(
    "--api",
    "api_url",
    metavar="URL",
    help="run the endpoints and dlq commands through a worker's admin API (e.g. http://host:6066) "
    "instead of Kafka, with WEBHOOKS_ADMIN_TOKEN; default: WEBHOOKS_API_URL",
)
@click.pass_context
def main(ctx: click.Context, env_file: str, api_url: str | None) -> None:
    """Signed, reliable webhooks for Perfex CRM change events, on Kafka."""
    load_env_file(env_file)  # first: it may set WEBHOOKS_API_URL and the token
    ctx.obj = {"api": api_url or os.environ.get("WEBHOOKS_API_URL") or None}


def api_client(if_version: int | None = None) -> Any:
    """The admin API client when `--api`/`WEBHOOKS_API_URL` is given (None: talk to Kafka)."""
    root = click.get_current_context().find_root()
    url = (root.obj or {}).get("api")
    if not url:
        return None
    if if_version is not None:  # the client does not send If-Match (yet); a lost race is still 409
        raise UserError("--if-version works only against Kafka, not with --api / WEBHOOKS_API_URL")
    from app.client import Client

    return Client(url, os.environ.get("WEBHOOKS_ADMIN_TOKEN") or None)


def _api_endpoint(ep: Any) -> dict[str, Any]:
    """An endpoint from the API client as a dict like Endpoint.public() (plus what the API adds)."""
    import dataclasses

    d = dataclasses.asdict(ep)
    d.pop("secret", None)
    return d


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
    from app.faust_guard import FaustGuardError, check_version

    try:
        check_version()  # the Faust workarounds' release, before anything contacts Kafka
    except FaustGuardError as exc:
        raise UserError(str(exc)) from exc
    from app.topics import apply, check_live_sizes, resolve_replication
    from app.worker import run_worker  # after the checks: Faust takes seconds to import

    if apply_topics:
        for line in apply(s, warn=lambda line: click.echo(line, err=True)):
            click.echo(line, err=True)
    check_live_sizes(s)  # topics too small for WEBHOOKS_MAX_EVENT_BYTES: refuse to start
    # Faust creates its own topics only when missing (apply declares them); same factor either way.
    s = dataclasses.replace(s, replication_factor=resolve_replication(s))
    try:
        run_worker(s, loglevel=loglevel)
    except FaustGuardError as exc:  # raised before the worker starts anything
        raise UserError(str(exc)) from exc


# ---- endpoints ----------------------------------------------------------------------------------
@main.group()
def endpoints() -> None:
    """Manage webhook endpoints (stored in the webhooks.endpoints topic)."""


def _write_endpoint(s: Settings, ep: Any, delete: bool = False) -> Any:
    """Write, then read back: a write that lost to a concurrent one is StaleWrite (exit 1).
    Returns the endpoint as written (its new version); `ep` for a delete."""
    from app.endpoints import write_endpoint

    return write_endpoint(s, ep.id, None if delete else ep) or ep


IF_VERSION = click.option(
    "--if-version",
    type=int,
    help="refuse unless the endpoint is still at this version (as `show --json` printed it)",
)


ORDERING = click.option(
    "--ordering",
    type=click.Choice(["none", "resource"]),
    help="resource: deliveries of one resource arrive in event order; a failing one holds back "
    "that resource's later deliveries to this endpoint only (default none)",
)


def _print_endpoint(ep_public: dict[str, Any]) -> None:
    state = (
        "enabled"
        if ep_public["enabled"]
        else f"disabled ({ep_public.get('disabled_reason') or 'by operator'})"
    )
    click.echo(f"{ep_public['id']}  {ep_public['mode']:<9} {state}")
    click.echo(f"  format: {ep_public.get('format', 'perfexapi')}")
    if ep_public.get("ordering", "none") != "none":
        click.echo(f"  ordering: {ep_public['ordering']} (deliveries of one resource arrive in event order)")
    click.echo(f"  url:    {ep_public['url']}")
    click.echo(f"  events: {', '.join(ep_public['events'])}")
    if ep_public.get("description"):
        click.echo(f"  about:  {ep_public['description']}")
    if ep_public.get("filter"):
        click.echo(f"  filter: {orjson.dumps(ep_public['filter']).decode()}")
    if ep_public.get("max_rate"):
        click.echo(f"  rate:   at most {ep_public['max_rate']:g} deliveries/s")
    if ep_public.get("grace_secret_active"):
        click.echo(f"  grace secret valid until {ep_public['grace_expires_at']:.0f} (unix)")


FILTER = click.option(
    "--filter",
    "filter_json",
    metavar="JSON",
    help='content filter on the delivery body, e.g. \'{"payload.status": {"$in": ["2", "3"]}}\' ({} removes it)',
)
MAX_RATE = click.option(
    "--max-rate", metavar="N/s", help="at most N deliveries per second over all workers (5/s, 120/m; 0 removes it)"
)


def _filter_arg(text: str | None) -> dict[str, Any] | None:
    """--filter's JSON, checked here so a typo is one clear line (the operators: app/filters.py)."""
    from app import filters

    if text is None:
        return None
    try:
        spec = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise UserError(f"--filter: not JSON: {exc}") from exc
    try:
        filters.validate(spec)
    except ValueError as exc:
        raise UserError(f"--filter: {exc}") from exc
    return spec


def _rate_arg(text: str | None) -> float | None:
    from app.throttle import parse_rate

    try:
        return None if text is None else parse_rate(text) or 0
    except ValueError as exc:
        raise UserError(f"--max-rate: {exc}") from exc


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
@FILTER
@MAX_RATE
@ORDERING
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_add(
    url: str,
    events: str,
    mode: str,
    fmt: str,
    secret: str | None,
    description: str,
    filter_json: str | None,
    max_rate: str | None,
    ordering: str | None,
    as_json: bool,
) -> None:
    """Register an endpoint; prints its id and (this once) its secret."""
    from app.endpoints import create_endpoint

    flt, rate = _filter_arg(filter_json), _rate_arg(max_rate) or None
    api = api_client()
    if api is not None:
        with api:
            made = api.create_endpoint(
                url, events, mode=mode, format=fmt, secret=secret, description=description, filter=flt,
                max_rate=rate,
                ordering=ordering or "none",
            )
        ep = SimpleNamespace(id=made.id, secret=made.secret, public=lambda: _api_endpoint(made))
    else:
        s = settings()
        ep = create_endpoint(
            s,
            url=url,
            events=events,
            mode=mode,
            secret=secret,
            description=description,
            format=fmt,
            filter=flt,
            max_rate=rate,
            ordering=ordering or "none",
        )
        ep = _write_endpoint(s, ep)
    if as_json:
        print_json({**ep.public(), "secret": ep.secret})
    else:
        click.echo(f"endpoint {ep.id} created")
        click.echo(f"secret: {ep.secret}")
        click.echo("(the secret is shown only now; store it where the receiver can verify signatures)")


@endpoints.command("update")
@click.argument("endpoint_id")
@click.option("--url")
@click.option("--events", help="comma-separated names or patterns")
@click.option("--mode", type=click.Choice(["immediate", "smart", "async"]))
@click.option("--format", "fmt", type=click.Choice(["perfexapi", "standard"]))
@click.option("--description")
@FILTER
@MAX_RATE
@ORDERING
@IF_VERSION
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_update(
    endpoint_id: str,
    url: str | None,
    events: str | None,
    mode: str | None,
    fmt: str | None,
    description: str | None,
    filter_json: str | None,
    max_rate: str | None,
    ordering: str | None,
    if_version: int | None,
    as_json: bool,
) -> None:
    """Change an endpoint: only the options given (its secret: rotate-secret; on/off: enable/disable)."""
    from app.endpoints import update_endpoint

    given = {"url": url, "events": events, "mode": mode, "format": fmt, "description": description}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if filter_json is not None:
        changes["filter"] = _filter_arg(filter_json)
    if max_rate is not None:
        changes["max_rate"] = _rate_arg(max_rate)
    if ordering is not None:
        changes["ordering"] = ordering
    if not changes:
        raise UserError(
            "nothing to change: give --url, --events, --mode, --format, --description, --filter, --max-rate or --ordering"
        )
    api = api_client(if_version)
    if api is not None:
        with api:
            row = _api_endpoint(api.update_endpoint(endpoint_id, **changes))
    else:
        s, ep = _load(endpoint_id, if_version)
        row = _write_endpoint(s, update_endpoint(s, ep, changes)).public()
    if as_json:
        print_json(row)
    else:
        _print_endpoint(row)


@endpoints.command("list")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_list(as_json: bool) -> None:
    """List endpoints (never their secrets)."""
    from app.endpoints import read_endpoints

    api = api_client()
    if api is not None:
        with api:
            eps: list[Any] = api.list_endpoints()
        rows = [_api_endpoint(e) for e in eps]
    else:
        eps = sorted(read_endpoints(settings()).values(), key=lambda e: e.created_at)
        rows = [e.public() for e in eps]
    if as_json:
        print_json(rows)
        return
    if not eps:
        click.echo("no endpoints; add one with `perfex-webhooks endpoints add`")
    for e in eps:
        state = "on " if e.enabled else "off"
        click.echo(f"{e.id}  {state} {e.mode:<9} {e.url}  [{', '.join(e.events)}]")


def _load(ep_id: str, if_version: int | None = None) -> tuple[Settings, Any]:
    from app.endpoints import check_version, find, read_endpoints

    s = settings()
    ep = find(read_endpoints(s), ep_id)
    check_version(ep, if_version)
    return s, ep


@endpoints.command("show")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_show(endpoint_id: str, as_json: bool) -> None:
    """Show one endpoint."""
    api = api_client()
    if api is not None:
        with api:
            row = _api_endpoint(api.get_endpoint(endpoint_id))
    else:
        row = _load(endpoint_id)[1].public()
    if as_json:
        print_json(row)
    else:
        _print_endpoint(row)


def _set_enabled(endpoint_id: str, enabled: bool, as_json: bool, if_version: int | None) -> None:
    from app.endpoints import update_endpoint

    api = api_client(if_version)
    if api is not None:
        with api:
            done = api.enable_endpoint(endpoint_id) if enabled else api.disable_endpoint(endpoint_id)
        row = _api_endpoint(done)
    else:
        s, ep = _load(endpoint_id, if_version)
        new = update_endpoint(s, ep, {"enabled": enabled})
        if not enabled:
            new = new.changed(disabled_reason="disabled by operator")
        new = _write_endpoint(s, new)
        row = new.public()
    if as_json:
        print_json(row)
    else:
        click.echo(f"endpoint {row['id']} {'enabled' if enabled else 'disabled'}")


@endpoints.command("enable")
@click.argument("endpoint_id")
@IF_VERSION
@click.option("--replay", is_flag=True, help="also replay its deliveries parked in the DLQ (while disabled)")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_enable(endpoint_id: str, if_version: int | None, replay: bool, as_json: bool) -> None:
    """Enable an endpoint (also one disabled by a 410 or auto-disabled), and offer to replay what
    was parked for it while it was disabled."""
    from app.endpoint_health import enable

    row = enable(settings, api_client(if_version), endpoint_id, replay, if_version)
    if as_json:
        print_json(row)
        return
    click.echo(f"endpoint {row['id']} enabled")
    if replay:
        click.echo(f"{row['replayed']} parked deliveries replayed")
    elif row.get("parked"):
        click.echo(
            f"{row['parked']} deliveries are parked for it in the DLQ: "
            f"`perfex-webhooks endpoints enable {row['id']} --replay` (or `dlq replay --endpoint`) sends them"
        )


@endpoints.command("breaker")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_breaker(endpoint_id: str, as_json: bool) -> None:
    """Show an endpoint's circuit breaker (closed, half_open, open), as a worker's admin API sees it
    (--api / WEBHOOKS_API_URL: each worker keeps its own breaker)."""
    from app.endpoint_health import breaker_lines

    api = api_client()
    if api is None:
        raise UserError("the breaker lives in the workers: give a worker's admin API (--api URL or WEBHOOKS_API_URL)")
    with api:
        state = api.breaker(endpoint_id)
    if as_json:
        print_json(state)
    else:
        for line in breaker_lines(state):
            click.echo(line)


@endpoints.command("disable")
@click.argument("endpoint_id")
@IF_VERSION
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_disable(endpoint_id: str, if_version: int | None, as_json: bool) -> None:
    """Disable an endpoint: its deliveries go to the DLQ until it is enabled."""
    _set_enabled(endpoint_id, False, as_json, if_version)


@endpoints.command("delete")
@click.argument("endpoint_id")
@IF_VERSION
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_delete(endpoint_id: str, if_version: int | None, as_json: bool) -> None:
    """Delete an endpoint (a tombstone on the compacted registry topic)."""
    api = api_client(if_version)
    if api is not None:
        with api:
            api.delete_endpoint(endpoint_id)
    else:
        s, ep = _load(endpoint_id, if_version)
        _write_endpoint(s, ep, delete=True)
    if as_json:
        print_json({"id": endpoint_id, "deleted": True})
    else:
        click.echo(f"endpoint {endpoint_id} deleted")


@endpoints.command("rotate-secret")
@click.argument("endpoint_id")
@click.option(
    "--grace", default="24h", show_default=True, help="how long the old secret still signs (max 24h)"
)
@IF_VERSION
@click.option("--json", "as_json", is_flag=True)
@_errors_to_one_line
def endpoints_rotate(endpoint_id: str, grace: str, if_version: int | None, as_json: bool) -> None:
    """New primary secret; the old one stays valid for --grace."""
    from app.config import parse_duration
    from app.endpoints import rotate_secret

    seconds = parse_duration(grace, "--grace")
    api = api_client(if_version)
    if api is not None:
        with api:
            made = api.rotate_secret(endpoint_id, seconds)
        new = SimpleNamespace(
            id=made.id,
            secret=made.secret,
            grace_expires_at=made.grace_expires_at,
            public=lambda: _api_endpoint(made),
        )
    else:
        s, ep = _load(endpoint_id, if_version)
        new = rotate_secret(ep, seconds)
        new = _write_endpoint(s, new)
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

    api = api_client()
    if api is not None:
        import dataclasses

        flt = _dlq_filter(endpoint, event, since, until)  # checks the times the same way
        with api:
            got = api.dlq(endpoint=endpoint, event=event, since=flt.since, until=flt.until)
        rows = [dataclasses.asdict(e) for e in reversed(got)]  # oldest first, as from Kafka
    else:
        try:
            entries = select(read_view(settings()), _dlq_filter(endpoint, event, since, until))
        except RuntimeError as exc:
            raise UserError(str(exc)) from exc
        rows = [summary(e) for e in entries]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("DLQ is empty" + (" for this filter" if endpoint or event or since or until else ""))
        return
    for s in rows:
        click.echo(
            f"{s['delivery_id']}  {s['endpoint_id']}  {s['event']:<28} {s['reason']:<18} "
            f"attempts={s['attempts']} last={s['last_status'] or s['last_error']}  "
            f"dead_at={now_rfc3339(float(s['dead_at'] or 0))}"
        )
    click.echo(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}")


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
    api = api_client()
    if api is not None:
        _replay_through_api(api, delivery_id, _dlq_filter(endpoint, event, since, until), dry_run, as_json)
        return
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



def _replay_through_api(api: Any, delivery_id: str | None, flt: Any, dry_run: bool, as_json: bool) -> None:
    from app.client import NotFound

    with api:
        if delivery_id and dry_run:
            try:
                api.dlq_entry(delivery_id)
            except NotFound as exc:
                raise UserError(f"no DLQ entry {delivery_id} (already replayed, or never dead)") from exc
            ids = [delivery_id]
        elif delivery_id:
            try:
                res = api.replay(delivery_id)
            except NotFound as exc:
                raise UserError(f"no DLQ entry {delivery_id} (already replayed, or never dead)") from exc
        else:
            res = api.replay_all(
                endpoint=flt.endpoint, event=flt.event, since=flt.since, until=flt.until, dry_run=dry_run
            )
            ids = res.delivery_ids
    if dry_run:
        if as_json:
            print_json({"dry_run": True, "would_replay": ids})
        else:
            for d_id in ids:
                click.echo(f"would replay {d_id}")
            click.echo(f"{len(ids)} would be replayed (dry run: nothing changed)")
        return
    if as_json:
        print_json({"replayed": res.replayed, "delivery_ids": res.delivery_ids})
    else:
        for warning in res.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"replayed {res.replayed} deliver{'y' if res.replayed == 1 else 'ies'}")


if __name__ == "__main__":
    main()
