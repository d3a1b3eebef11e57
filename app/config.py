"""Settings from environment variables (SPEC §4), with an optional `.env`-style file.

Every worker, CLI command and test reads configuration through `Settings.from_env()`, so the
names in SPEC §4 are defined in exactly one place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ConfigError  # re-exported: raised here and by app/secretbox.py

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

DEFAULT_RETRY_SCHEDULE = "30s,1m,5m,15m,1h,6h,12h,24h"
# One tier topic per default delay (app/route.py names them): a schedule may be shorter, not longer.
MAX_TIERS = len(DEFAULT_RETRY_SCHEDULE.split(","))


MIN_TOKEN_LENGTH = 32
# Values that appeared in our own docs and manifests, and the usual stand-ins: a worker that serves
# the API with one of them is open to anyone who has read those docs.
PLACEHOLDER_TOKENS = frozenset(
    {
        "change-me-to-a-long-random-token",
        "change-me",
        "changeme",
        "replace-me",
        "secret",
        "token",
        "password",
        "your-token-here",
    }
)
TOKEN_VARIABLES = ("WEBHOOKS_ADMIN_TOKEN", "WEBHOOKS_INGEST_TOKEN", "WEBHOOKS_READ_TOKEN", "WEBHOOKS_METRICS_TOKEN")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def check_token(name: str, value: str | None) -> None:
    """Refuse a token a guesser or a reader of our docs could know (one line naming the variable)."""
    if value is None:
        return
    low = value.strip().lower()
    if low in PLACEHOLDER_TOKENS or "change-me" in low or "changeme" in low:
        raise ConfigError(f"{name}: refusing a placeholder token; generate one with `openssl rand -hex 32`")
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{name}: a token needs at least {MIN_TOKEN_LENGTH} characters (this one has {len(value)}); "
            "generate one with `openssl rand -hex 32`"
        )


def is_loopback_host(host: str) -> bool:
    import ipaddress

    if host.strip("[]").lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_duration(text: str, name: str = "duration") -> float:
    """'200ms' / '30s' / '5m' / '1h' / '1d' / '2' (seconds) -> seconds as float."""
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(f"{name}: {text!r} is not a duration like 200ms, 30s, 5m, 1h")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _bool(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    return text.strip().lower() in {"1", "true", "yes", "on"}


def _number(e: Mapping[str, str], name: str, default: float) -> float:
    text = e.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a number") from exc
    if value < 0:
        raise ConfigError(f"{name}: must not be negative")
    return value


def _positive(text: str | None, name: str) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}: {text!r} is not a positive whole number")
    return value


def load_env_file(path: str | os.PathLike[str] = ".env") -> None:
    """Read KEY=VALUE lines into os.environ without overriding what is already set."""
    p = Path(path)
    if not p.is_file():
        return
    for raw in p.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip().strip('"').strip("'")
        os.environ.setdefault(key, value)


def _allowed_targets(text: str) -> frozenset[str]:
    from app.netguard import parse_allowed_targets  # aiohttp-heavy: only when the variable is set

    if not text.strip():
        return frozenset()
    try:
        return parse_allowed_targets(text)
    except ValueError as exc:
        raise ConfigError(f"WEBHOOKS_ALLOWED_TARGETS: {exc}") from exc


def _poll_interval(text: str) -> float:
    value = parse_duration(text, "WEBHOOKS_MAX_POLL_INTERVAL")
    if value < 10:  # Kafka clients refuse one below the session timeout (10 s)
        raise ConfigError(f"WEBHOOKS_MAX_POLL_INTERVAL: {text!r} is below the 10 s session timeout")
    return value


@dataclass(frozen=True)
class HealthSettings:
    """Endpoint health (app/breaker.py, docs/admin.md "Endpoint health"): the circuit breaker,
    auto-disable and the operator webhook."""

    # The breaker opens after this many consecutive failed attempts (0: never on a streak) ...
    breaker_failures: int = 10
    # ... or when over `breaker_rate` of at least `breaker_min_attempts` attempts in the last
    # `breaker_window` seconds failed (rate 0: never on a rate).
    breaker_rate: float = 0.5
    breaker_window: float = 60.0
    breaker_min_attempts: int = 20
    # Open this long before one probe (half-open) tests the endpoint again. Default: the first
    # tier's delay, so a held delivery's next retry finds the probe free (a lone failing delivery
    # keeps all its attempts).
    breaker_cooldown: float = 30.0
    # An endpoint failing continuously for this long is disabled (0: never). Svix: 5 days.
    auto_disable_after: float = 5 * 86400.0
    # Told (a signed JSON POST) when an endpoint is disabled automatically; None: log and metric only.
    operator_webhook_url: str | None = None
    operator_webhook_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, e: Mapping[str, str], first_tier: float = 30.0) -> HealthSettings:
        def duration(name: str, default: str) -> float:
            return parse_duration(e.get(name) or default, name)

        rate = _number(e, "WEBHOOKS_BREAKER_FAILURE_RATE", 0.5)
        if rate > 1:
            raise ConfigError("WEBHOOKS_BREAKER_FAILURE_RATE: a share between 0 and 1, e.g. 0.5")
        secret = e.get("WEBHOOKS_OPERATOR_WEBHOOK_SECRET") or None
        if e.get("WEBHOOKS_OPERATOR_WEBHOOK_URL") and (secret is None or len(secret) < 16):
            raise ConfigError(
                "WEBHOOKS_OPERATOR_WEBHOOK_SECRET: the operator webhook is signed; give a secret of 16+ "
                "characters (e.g. `openssl rand -hex 32`)"
            )
        return cls(
            breaker_failures=int(_number(e, "WEBHOOKS_BREAKER_FAILURES", 10)),
            breaker_rate=rate,
            breaker_window=duration("WEBHOOKS_BREAKER_WINDOW", "60s"),
            breaker_min_attempts=max(1, int(_number(e, "WEBHOOKS_BREAKER_MIN_ATTEMPTS", 20))),
            breaker_cooldown=duration("WEBHOOKS_BREAKER_COOLDOWN", f"{first_tier}s"),
            auto_disable_after=duration("WEBHOOKS_AUTO_DISABLE_AFTER", "5d"),
            operator_webhook_url=e.get("WEBHOOKS_OPERATOR_WEBHOOK_URL") or None,
            operator_webhook_secret=secret,
        )


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = "localhost:9092"
    topic_prefix: str = ""
    retry_schedule: tuple[float, ...] = field(
        default_factory=lambda: tuple(parse_duration(x) for x in DEFAULT_RETRY_SCHEDULE.split(","))
    )
    smart_window: float = 2.0
    smart_max_wait: float = 30.0
    delivery_timeout: float = 10.0
    web_port: int = 6066
    web_host: str = "0.0.0.0"
    admin_token: str | None = field(default=None, repr=False)
    admin_insecure: bool = False
    # Scoped tokens (docs/admin.md): ingest may only POST /api/events, read may only GET.
    ingest_token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)
    # Token bucket per token on POST /api/events: `ingest_rate` requests/s refill, `ingest_burst`
    # capacity; a rate of 0 turns the limit off.
    ingest_rate: float = 200.0
    ingest_burst: int = 400
    # Fernet keys (comma-separated, newest first) for endpoint secrets at rest; none = clear.
    secrets_key: str | None = field(default=None, repr=False)
    allow_private_targets: bool = False
    # host:port pairs the SSRF guard lets through although private (app/netguard.py)
    allowed_targets: frozenset[str] = frozenset()
    max_event_bytes: int = 1_000_000
    # Concurrency of the HTTP hot path inside one worker (see docs/architecture.md).
    max_in_flight: int = 64
    max_in_flight_per_endpoint: int = 8
    response_body_cap: int = 4096
    # A consumer that does not poll for this long leaves its group (Kafka's max.poll.interval.ms).
    # No consumer thread blocks for more than a small part of it (app/consumers/base.py).
    max_poll_interval: float = 300.0
    data_dir: str = ".cache/faust-data"
    # Replicas of every topic; None: min(3, brokers in the cluster) (app/topics.py).
    replication_factor: int | None = None
    health: HealthSettings = field(default_factory=HealthSettings)  # breaker, auto-disable

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        schedule_text = e.get("WEBHOOKS_RETRY_SCHEDULE") or DEFAULT_RETRY_SCHEDULE
        schedule = tuple(
            parse_duration(x, "WEBHOOKS_RETRY_SCHEDULE") for x in schedule_text.split(",") if x.strip()
        )
        if not 1 <= len(schedule) <= MAX_TIERS:
            raise ConfigError(f"WEBHOOKS_RETRY_SCHEDULE: needs 1 to {MAX_TIERS} delays")
        try:
            port = int(e.get("WEBHOOKS_WEB_PORT") or 6066)
        except ValueError as exc:
            raise ConfigError(f"WEBHOOKS_WEB_PORT: {e.get('WEBHOOKS_WEB_PORT')!r} is not a port") from exc
        insecure = _bool(e.get("WEBHOOKS_ADMIN_INSECURE"), False)
        return cls(
            bootstrap_servers=e.get("KAFKA_BOOTSTRAP_SERVERS") or "localhost:9092",
            topic_prefix=e.get("WEBHOOKS_TOPIC_PREFIX") or "",
            retry_schedule=schedule,
            smart_window=parse_duration(e.get("WEBHOOKS_SMART_WINDOW") or "2s", "WEBHOOKS_SMART_WINDOW"),
            smart_max_wait=parse_duration(
                e.get("WEBHOOKS_SMART_MAX_WAIT") or "30s", "WEBHOOKS_SMART_MAX_WAIT"
            ),
            delivery_timeout=parse_duration(
                e.get("WEBHOOKS_DELIVERY_TIMEOUT") or "10s", "WEBHOOKS_DELIVERY_TIMEOUT"
            ),
            web_port=port,
            # Insecure mode (no token) listens on loopback only unless a host is named (and then
            # check_serving() refuses any non-loopback one).
            web_host=e.get("WEBHOOKS_WEB_HOST")
            or ("127.0.0.1" if insecure and not e.get("WEBHOOKS_ADMIN_TOKEN") else "0.0.0.0"),
            admin_token=e.get("WEBHOOKS_ADMIN_TOKEN") or None,
            admin_insecure=insecure,
            ingest_token=e.get("WEBHOOKS_INGEST_TOKEN") or None,
            read_token=e.get("WEBHOOKS_READ_TOKEN") or None,
            metrics_token=e.get("WEBHOOKS_METRICS_TOKEN") or None,
            ingest_rate=_number(e, "WEBHOOKS_INGEST_RATE", 200.0),
            ingest_burst=int(_number(e, "WEBHOOKS_INGEST_BURST", 400)),
            secrets_key=e.get("WEBHOOKS_SECRETS_KEY") or None,
            allow_private_targets=_bool(e.get("WEBHOOKS_ALLOW_PRIVATE_TARGETS"), False),
            allowed_targets=_allowed_targets(e.get("WEBHOOKS_ALLOWED_TARGETS") or ""),
            max_event_bytes=int(e.get("WEBHOOKS_MAX_EVENT_BYTES") or 1_000_000),
            max_in_flight=int(e.get("WEBHOOKS_MAX_IN_FLIGHT") or 64),
            max_in_flight_per_endpoint=int(e.get("WEBHOOKS_MAX_IN_FLIGHT_PER_ENDPOINT") or 8),
            data_dir=e.get("WEBHOOKS_DATA_DIR") or ".cache/faust-data",
            replication_factor=_positive(e.get("WEBHOOKS_REPLICATION_FACTOR"), "WEBHOOKS_REPLICATION_FACTOR"),
            max_poll_interval=_poll_interval(e.get("WEBHOOKS_MAX_POLL_INTERVAL") or "300s"),
            health=HealthSettings.from_env(e, first_tier=schedule[0]),
        )

    def check_serving(self) -> None:
        """What a process that serves the admin API must refuse before it listens (ConfigError)."""
        for name, value in zip(
            TOKEN_VARIABLES,
            (self.admin_token, self.ingest_token, self.read_token, self.metrics_token),
            strict=True,
        ):
            check_token(name, value)
        given = [v for v in (self.admin_token, self.ingest_token, self.read_token) if v]
        if len(set(given)) != len(given):
            raise ConfigError("WEBHOOKS_INGEST_TOKEN / WEBHOOKS_READ_TOKEN: each scope needs its own token")
        if not self.admin_token and self.admin_insecure and not is_loopback_host(self.web_host):
            raise ConfigError(
                f"WEBHOOKS_WEB_HOST: insecure mode (WEBHOOKS_ADMIN_INSECURE=true, no token) listens on "
                f"loopback only; {self.web_host!r} is not a loopback address"
            )
        if self.secrets_key:
            from app.secretbox import SecretBox

            SecretBox.from_keys(self.secrets_key)  # a bad key is a start-up error, not a 500 later

    def topic(self, name: str) -> str:
        """The full topic name for a logical SPEC name, with the install's prefix."""
        return f"{self.topic_prefix}{name}"

    @property
    def group_id(self) -> str:
        return f"{self.topic_prefix}perfex-webhooks"
