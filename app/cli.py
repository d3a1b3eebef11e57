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
@click.option("--replication-factor", type=int, help="override topics.yaml for new topics")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="seconds to reach the broker")
@_errors_to_one_line
def topics_apply(replication_factor: int | None, timeout: float) -> None:
    """Create or reconcile topics from topics.yaml (idempotent)."""
    from app.topics import apply

    changes = apply(settings(), replication_factor=replication_factor, timeout=timeout)
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


if __name__ == "__main__":
    main()
