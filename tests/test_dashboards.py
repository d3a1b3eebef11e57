"""Every Grafana panel shows the value a known load implies, from a real Prometheus scraping a real
worker (not merely "some data": 0, NaN or a wrong label selector fail).

Prometheus is Debian's `prometheus` (scripts/bootstrap installs it) with its own config and TSDB in
a temp dir, scraping the worker every second. The load is steady and designed (see `Load`): every
kind of series the dashboards show has a rate that follows from the pace of the load, which is
measured from the worker's own count, so each panel's value is asserted within a tolerance. Grafana's
own variables are replaced the way Grafana would ($__rate_interval = 4 x scrape interval, rounded
up); `$endpoint` is replaced by every value its label_values() query returns. The `or ... * 0`
branches (0 instead of "no data" for an endpoint that never succeeded) are checked on their own.

The endpoint controls' panels (breakers, auto-disable, throttling, filters, ordering, duplicates,
poison) are checked the same way with a load of their own, on a worker whose breaker is on (the
main load's always-failing endpoint needs it off). Every metric app/metrics.py exports has a panel,
and every metric a panel names is exported.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import metrics as app_metrics
from app.config import Settings
from app.dlq import read_view
from app.producer import Producer
from tests.helpers import (
    eventually,
    metric,
    register,
    register_load_endpoints,
    require_tool,
    settle,
)
from tests.receiver import Receiver, Reply
from tests.workers import OUTPUT, WorkerProcess, free_port

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARS = {"__rate_interval": "15s", "__interval": "5s", "__range": "1m", "__range_s": "60"}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every Prometheus target."""
    for p in panels(dashboard):
        for t in p.get("targets", []):
            if t.get("expr") and not t.get("hide"):
                yield p.get("title", f"panel {p.get('id')}"), t.get("refId", "?"), t["expr"]


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


class Prometheus:
    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: perfex-webhooks\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                require_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited; see {self.log_path}"
            try:
                if httpx.get(self.base + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout:.0f}s; see {self.log_path}")

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        data = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        r = httpx.post(self.base + "/api/v1/query", data=data, timeout=10)
        return r.json()

    def label_values(self, metric: str, label: str) -> list[str]:
        r = httpx.get(self.base + f"/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        doc = r.json()
        assert doc["status"] == "success", doc
        return list(doc["data"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus_bin() -> str:
    return require_tool("prometheus")


def variable_values(prom: Prometheus, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each query variable's values, from its label_values(metric, label) query."""
    out: dict[str, list[str]] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        text = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", text or "")
        assert m, f"{dashboard['title']}: variable {var['name']}: only label_values(metric, label) is checked"
        out[var["name"]] = prom.label_values(m.group(1), m.group(2))
    return out


# ---- the load: designed, so that every panel has a value we can work out ------------------------------
# Endpoints (tests/helpers.register_load_endpoints + "gate"): immediate "invoice.*,lead.*", async
# "invoice.*,lead.*", smart "invoice.*", fail "lead.created" (immediate, always 500, 3 tiers: 4
# attempts, then the DLQ), gone "lead.deleted" (410), gate "customer.*" (async; answers when let).
# One tick: 2 x invoice.updated of one fresh invoice (smart collapses them), 1 x lead.created, 1 x
# customer.updated, 1 record that is not JSON. A warm-up tick first creates every series (Prometheus
# cannot see the first increment of a series it has never scraped); then N ticks, one lead.deleted
# (the 410 endpoint re-enabled after the warm-up) and one DLQ replay, counted over a window W that
# holds exactly them. Counters are asserted as rates over W; gauges while deliveries are held.
N = 10
# Long enough that the held smart items stay pending while a loaded machine's Prometheus scrapes
# them (3 s lost the race in a clean-clone run: the gauge read 0).
SMART_WINDOW = 6.0
HELD = 4  # deliveries the gate holds open
SMART_HELD = 3  # smart items held in their window at the same time
Want = tuple[float, float]  # the accepted range of a series' value (NaN fails)


def rate(delta: float, w: float) -> Want:
    """A counter that grew by `delta` inside the window of `w` seconds: rate() extrapolates the
    sampled span (one scrape shorter) to the window, so a little above delta / w."""
    return (delta / w * 0.95, delta / w * 1.15)


def exactly(x: float) -> Want:
    return (x, x)


# Phase B totals, by design (see above)
SUCCESS = {"immediate": 3 * N + 1, "async": 3 * N + 1, "smart": N, "gate": N}  # role -> 2xx
MODE = {"immediate": "immediate", "async": "async", "smart": "smart", "gate": "async", "fail": "immediate", "gone": "immediate"}
FAILED = 4 * (N + 1)  # the fail endpoint: N leads and one replayed, 4 attempts each
TOTAL = sum(SUCCESS.values()) + FAILED + 1  # + the one 410


def overview(w: float) -> dict[tuple[str, str], dict[str, Want]]:
    """(panel, refId) -> {series labels 'k=v,...' ('' for one unlabelled series, '*' any other,
    'sum' all of them added up): range},
    for the counters over the window W that holds phase B."""
    ok = sum(SUCCESS.values())
    ratio = ok / TOTAL
    return {
        ("Events in /s", "A"): {"": rate(4 * N + 1, w)},
        ("Deliveries /s", "A"): {"": rate(ok, w)},
        ("Success ratio", "A"): {"": (ratio * 0.97, ratio * 1.03)},
        ("Events consumed by event", "A"): {
            "event=invoice.updated": rate(2 * N, w),
            "event=lead.created": rate(N, w),
            "event=customer.updated": rate(N, w),
            "event=lead.deleted": rate(1, w),
        },
        ("HTTP attempts by outcome", "A"): {
            "outcome=success": rate(ok, w),
            "outcome=http_error": rate(FAILED, w),
            "outcome=gone": rate(1, w),
        },
        ("Success ratio by mode", "A"): {
            "mode=immediate": around((3 * N + 1) / (3 * N + 1 + FAILED + 1), 0.03),
            "mode=async": exactly(1),
            "mode=smart": exactly(1),
        },
        ("Throughput by mode", "A"): {
            "mode=immediate": rate(3 * N + 1 + FAILED + 1, w),
            "mode=async": rate(4 * N + 1, w),
            "mode=smart": rate(N, w),
        },
        # Latency: bounds that follow from the design (the smart window; histogram_quantile
        # interpolates inside the bucket around it), no speed is judged.
        **{
            ("End-to-end latency by mode", ref): {
                "mode=immediate": (1e-6, 60),
                "mode=async": (1e-6, 60),
                "mode=smart": (2.5, 60),  # >= the 6 s window, in bucket (5, 10] or above
            }
            for ref in "ABC"
        },
        **{
            ("HTTP attempt latency by mode", ref): {f"mode={m}": (1e-6, 30) for m in ("immediate", "async", "smart")}
            for ref in "ABC"
        },
        ("Retries scheduled per tier", "A"): {f"tier={t}": rate(N + 1, w) for t in ("30s", "1m", "5m")},
        ("DLQ entries by reason", "A"): {"reason=retries_exhausted": rate(N + 1, w), "reason=gone": rate(1, w)},
        ("Invalid input by reason", "A"): {"reason=not_json": rate(N, w)},
        ("Replays (time range)", "A"): {"": (0.95, 1.15)},
        ("Endpoints disabled by 410 (time range)", "A"): {"": (0.95, 1.15)},
        ("Endpoints by state", "A"): {"state=enabled": exactly(5), "state=disabled": exactly(1)},
        # warm-up: 1 lead + 1 gone parked; phase B: N leads + 1 gone (the replayed one keeps its key)
        ("DLQ size", "A"): {"": exactly(N + 3)},
        ("Smart collapse ratio", "A"): {"": (1.9, 2.1)},
        ("Smart deliveries and merged events", "A"): {"": rate(N, w)},
        ("Smart deliveries and merged events", "B"): {"": rate(2 * N, w)},
    }


# Gauges, while the gate holds HELD deliveries and SMART_HELD smart items wait out their window.
HELD_GAUGES: dict[tuple[str, str], dict[str, Want]] = {
    ("HTTP requests in flight", "A"): {"*": exactly(HELD)},
    ("Smart items pending", "A"): {"*": exactly(SMART_HELD)},
    # The held records are not committed (nor records behind them on their partitions: at most the
    # SMART_HELD async invoice deliveries); every other topic is done.
    ("Consumer lag", "A"): {"": (HELD, HELD + SMART_HELD)},
    # Which topic holds them depends on how long they are held (the agent may hand a long-held
    # delivery on to a tier): the series add up to the total.
    ("Consumer lag by topic", "A"): {"sum": (HELD, HELD + SMART_HELD), "*": (0, HELD + SMART_HELD)},
    ("Workers", "A"): {"": exactly(1)},
}


def around(x: float, rel: float) -> Want:
    return (x * (1 - rel), x * (1 + rel))


def endpoint_view(role: str, w: float) -> dict[tuple[str, str], dict[str, Want]]:
    ok = SUCCESS.get(role, 0)
    failed = FAILED if role == "fail" else 1 if role == "gone" else 0
    outcome = "success" if ok else "http_error" if role == "fail" else "gone"
    ratio = exactly(1) if ok else exactly(0)  # 0 from the `or ... * 0` branch, not "no data"
    return {
        ("Success ratio", "A"): {"": ratio},
        ("Attempts (time range)", "A"): {"": (ok + failed, (ok + failed) * 1.15)},
        # Endpoints that never failed take the masked branch: exactly 0.
        ("Failed attempts (time range)", "A"): {"": (failed, failed * 1.15)},
        ("Share of all attempts", "A"): {"": around((ok + failed) / TOTAL, 0.03)},
        ("Attempts by outcome", "A"): {f"outcome={outcome}": rate(ok + failed, w)},
        ("Success ratio over time", "A"): {"": ratio},
        ("Attempts by mode", "A"): {f"mode={MODE[role]}": rate(ok + failed, w)},
        ("Attempts by worker", "A"): {"*": rate(ok + failed, w)},
    }


def series_key(metric_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(metric_labels.items()))


def check_query(prom: Prometheus, where: str, q: str, want: dict[str, Want], at: float) -> list[str]:
    doc = prom.query(q, at)
    if doc.get("status") != "success":
        return [f"{where}: invalid query {q!r}: {doc.get('error')}"]
    got = {series_key(x["metric"]): float(x["value"][1]) for x in doc["data"]["result"]}
    problems = []
    if not got:
        return [f"{where}: no series for {q!r}"]
    rest = dict(got)
    if "sum" in want and not want["sum"][0] <= sum(got.values()) <= want["sum"][1]:
        problems.append(f"{where}: the series add up to {sum(got.values()):g}, expected {want['sum']}: {got}")
    for key, (lo, hi) in want.items():
        if key in ("*", "sum"):
            continue
        if key not in got:
            problems.append(f"{where}: no series {key or '(the sum)'} in {got} for {q!r}")
            continue
        v = rest.pop(key)
        if not lo - 1e-9 <= v <= hi + 1e-9:  # NaN fails too
            problems.append(f"{where}: {key or 'value'} = {v:g}, expected {lo:g} .. {hi:g}")
    if "*" in want:
        lo, hi = want["*"]
        problems += [f"{where}: {k} = {v:g}, expected {lo:g} .. {hi:g}" for k, v in rest.items() if not lo <= v <= hi]
    elif rest:
        problems.append(f"{where}: unexpected series {rest} for {q!r}")
    return problems


def keep_for_inspection(workdir: Path, name: str) -> None:
    """A failed check keeps Prometheus's config and rules (not its data) in test-output/<name>."""
    keep = OUTPUT / name
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(workdir, keep, ignore=shutil.ignore_patterns("data"))


def check_dashboard(
    prom: Prometheus,
    path: Path,
    expect: Callable[[dict[str, str]], dict[tuple[str, str], dict[str, Want]]],
    at: float,
    grafana: dict[str, str],
    skip: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
) -> list[str]:
    """Every query of a dashboard (but `skip`), for every value of its variables, against its
    expected values; `grafana`: Grafana's own variables for the window checked."""
    dash = json.loads(path.read_text())
    variables = variable_values(prom, dash)
    problems = [f"{path.name}: variable ${n} has no values" for n, v in variables.items() if not v]
    passes: list[dict[str, str]] = [{}]
    for name, values in variables.items():
        passes = [{**p, name: v} for p in passes for v in values] or passes
    for bindings in passes:
        values = {**grafana, "datasource": "prometheus", **bindings}
        wants = expect(bindings)
        seen = set()
        for title, ref, expr in queries(dash):
            where = f"{path.name} / {title!r} / {ref} {bindings or ''}"
            seen.add((title, ref))
            if (title, ref) in skip:
                continue
            if (title, ref) not in wants:
                problems.append(f"{where}: no expected value declared in tests/test_dashboards.py")
                continue
            try:
                q = substitute(expr, values)
            except KeyError as exc:
                problems.append(f"{where}: {exc}")
                continue
            problems += check_query(prom, where, q, wants[(title, ref)], at)
        problems += [f"{path.name}: expected panel {k} is not in the dashboard" for k in set(wants) - seen]
    return problems


def masked(expr: str, endpoint: str) -> str:
    """The expression with every webhooks_deliveries_total selector narrowed to one endpoint."""
    expr = expr.replace("webhooks_deliveries_total{", f'webhooks_deliveries_total{{endpoint="{endpoint}", ')
    return expr.replace("webhooks_deliveries_total[", f'webhooks_deliveries_total{{endpoint="{endpoint}"}}[')


def test_dashboards_exist() -> None:
    names = {p.name for p in DASHBOARDS}
    assert {"perfex-webhooks-overview.json", "perfex-webhooks-endpoint.json"} <= names
    for path in DASHBOARDS:
        assert list(queries(json.loads(path.read_text()))), f"{path.name} has no queries"


def exported_series() -> set[str]:
    """The series names a worker exports (app/metrics.py): counters as `_total`, histograms by
    their buckets (what rate() and histogram_quantile() read)."""
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    return {f.name + suffix[f.type] for f in app_metrics.REGISTRY.collect()}


def test_every_metric_has_a_panel_and_every_panel_an_exported_metric() -> None:
    exprs = [expr for path in DASHBOARDS for _, _, expr in queries(json.loads(path.read_text()))]
    named = {m for expr in exprs for m in re.findall(r"\bwebhooks_\w+", expr)}
    exported = exported_series()
    assert exported - named == set(), "metrics without a Grafana panel (add one, checked below)"
    assert named - exported == set(), "panels name metrics no worker exports"
    # A counter is only ever shown through rate() or increase(), a gauge never through them.
    for expr in exprs:
        for m in re.findall(r"\bwebhooks_\w+", expr):
            if m.endswith(("_total", "_bucket")):
                assert re.search(rf"(rate|increase)\({m}\b", expr), f"{m} without rate()/increase(): {expr}"
            else:
                assert not re.search(rf"(rate|increase)\({m}\b", expr), f"gauge {m} in rate(): {expr}"


def test_every_panel_shows_the_value_the_load_implies(
    prometheus_bin: str, settings: Settings, receiver: Receiver, workers, tmp_path: Path
) -> None:
    eps = register_load_endpoints(settings, receiver, fail="immediate")
    gate = threading.Event()
    gate.set()
    receiver.on("/gate", lambda n: Reply(200, gate=gate))
    eps["gate"] = register(settings, receiver, "/gate", "customer.*", "async")
    roles = {ep.id: role for role, ep in eps.items()}
    w: WorkerProcess = workers(
        WEBHOOKS_RETRY_SCHEDULE="100ms,100ms,100ms",
        WEBHOOKS_SMART_WINDOW=f"{SMART_WINDOW:g}s",
        WEBHOOKS_SMART_MAX_WAIT="30s",
    )
    workdir = Path(tmp_path)
    prom = Prometheus(f"127.0.0.1:{w.port}", workdir)
    dashboards = {p.name: json.loads(p.read_text()) for p in DASHBOARDS}
    overview_path = ROOT / "grafana" / "dashboards" / "perfex-webhooks-overview.json"
    try:
        prom.wait_ready()

        def scraped_after(t: float) -> bool:
            doc = prom.query('timestamp(up{job="perfex-webhooks"} == 1)')
            return bool(doc["data"]["result"]) and float(doc["data"]["result"][0]["value"][1]) > t

        eventually(lambda: scraped_after(0), 30, f"a first scrape (see {prom.log_path})")

        def parked(n: int) -> Callable[[], bool]:
            return lambda: metric(w.metrics(), "webhooks_dlq_size") == n

        # Warm-up: one tick, and the 410 endpoint once (then enabled again for phase B).
        with Producer(settings) as p:
            tick(p, "w")
            p.emit("lead.deleted", "gone-w", {"id": "gone-w"})
        settle(w, accounted=parked(2))
        r = w.api("PATCH", f"/api/endpoints/{eps['gone'].id}", json={"enabled": True})
        assert r.status_code == 200, r.text
        eventually(lambda: metric(w.metrics(), "webhooks_endpoints", state="disabled") == 0, 30, "re-enabled")
        t0 = time.time()
        eventually(lambda: scraped_after(t0), 10, "a scrape before phase B")

        # Phase B: N ticks, one 410, one replay of the warm-up's parked lead.
        (lead,) = [k for k, e in read_view(settings).items() if e["dlq_reason"] == "retries_exhausted"]
        with Producer(settings) as p:
            for i in range(N):
                tick(p, str(i))
            p.emit("lead.deleted", "gone-b", {"id": "gone-b"})
        r = w.api("POST", f"/api/dlq/{lead}/replay")
        assert r.status_code == 200 and r.json()["replayed"] == 1, r.text
        settle(
            w,
            accounted=lambda: parked(N + 3)()
            and len(receiver.received("/fail")) == 4 * (N + 2)
            and metric(w.metrics(), "webhooks_endpoints", state="disabled") == 1,
            timeout=120,
        )
        t1 = time.time()
        eventually(lambda: scraped_after(t1), 10, "a scrape after phase B")
        at = time.time()
        window = math.ceil(at - t0) + 1  # holds all of phase B, and nothing of the warm-up
        grafana = {**GRAFANA_VARS, "__rate_interval": f"{window}s", "__range": f"{window}s"}
        problems: list[str] = []
        skip = set(HELD_GAUGES) | {key for key in panel_keys(overview_path) if key[0] in CONTROL_PANELS}
        problems += check_dashboard(prom, overview_path, lambda b: overview(window), at, grafana, skip)
        endpoint_path = ROOT / "grafana" / "dashboards" / "perfex-webhooks-endpoint.json"
        assert set(variable_values(prom, dashboards[endpoint_path.name])["endpoint"]) == set(roles)
        problems += check_dashboard(
            prom, endpoint_path, lambda b: endpoint_view(roles[b["endpoint"]], window), at, grafana
        )
        # The masked branch (`or ... * 0`) of the overview, on its own: 0 for an endpoint that never
        # succeeded, where the other branch has no series at all.
        for title, ref, expr in queries(dashboards[overview_path.name]):
            if "* 0" in expr:
                q = substitute(masked(expr, eps["fail"].id), grafana)
                problems += check_query(prom, f"masked {title!r}/{ref}", q, {"*": exactly(0)}, at)

        # Gauges: hold HELD deliveries at the gate and SMART_HELD smart items in their window.
        gate.clear()
        with Producer(settings) as p:
            for i in range(HELD):
                p.emit("customer.updated", f"held{i}", {"id": f"held{i}"}, flush=False)
        eventually(lambda: len(receiver.received("/gate")) >= N + 1 + HELD, 60, "held deliveries at the gate")
        # The smart items only now, so their window starts when the panels are read.
        with Producer(settings) as p:
            for i in range(SMART_HELD):
                p.emit("invoice.updated", f"held{i}", {"id": f"held{i}"}, flush=False)
        held: list[str] = []
        deadline = time.monotonic() + 20
        for title, ref, expr in queries(dashboards[overview_path.name]):
            if (title, ref) not in HELD_GAUGES:
                continue
            q = substitute(expr, grafana)
            # The panel shows the held value once Prometheus scraped it: poll for it (a deadline).
            while found := check_query(prom, f"held {title!r}/{ref}", q, HELD_GAUGES[(title, ref)], time.time()):
                if time.monotonic() > deadline:
                    held += found
                    break
                time.sleep(0.2)
        gate.set()
        problems += held
        if problems:
            keep_for_inspection(workdir, "prometheus-dashboards")
        assert not problems, f"dashboard values off (window {window}s):\n" + "\n".join(problems)
    finally:
        gate.set()
        prom.stop()


def tick(p: Producer, tag: str) -> None:
    """One tick of the designed load (see above); `tag` keeps its resources fresh."""
    for k in range(2):
        p.emit("invoice.updated", f"inv{tag}", {"id": f"inv{tag}", "k": str(k)}, flush=False)
    p.emit("lead.created", f"lead{tag}", {"id": f"lead{tag}"}, flush=False)
    p.emit("customer.updated", f"cus{tag}", {"id": f"cus{tag}"}, flush=False)
    p.send("crm.events", f"invoice:bad{tag}", b"{not json")


# ---- the endpoint controls' panels ------------------------------------------------------------------
# Endpoints: flt "lead.*" with a filter on payload.status, err "lead.*" with a filter that errors on
# an object total, thr "estimate.*" at THR_RATE/s, ord "invoice.*" ordered per resource (its
# receiver answers a head's first attempt 503 with a Retry-After), brk "contract.*" (always 500).
# One controls tick: a lead only err gets (flt leaves it out), a lead only flt gets (err's filter
# errors on it), THR_K estimates at once (all but the first over the rate), a resource's invoice
# 1..3 (2 and 3 held behind 1, then released), one record on webhooks.deliveries that is no
# delivery (poison). A warm-up tick creates the labelled series; phase C is one tick plus the
# broken endpoint: its breaker opens after BREAKER_FAILURES failures, and a delivery held by it
# after AUTO_DISABLE s of failing gets it auto-disabled.
THR_RATE, THR_K = 4, 3
BREAKER_FAILURES = 3
AUTO_DISABLE = 1.0
HEAD_WAIT = {"w": 1, "c": 2}  # Retry-After of the head's first attempt: phase C's is read while held
CONTROL_PANELS = {
    "Open circuit breakers",
    "Circuit breaker state by endpoint",
    "Endpoints auto-disabled (time range)",
    "Ordering: blocked sequences",
    "Deliveries throttled by endpoint",
    "Deliveries filtered out by endpoint",
    "Filter errors by endpoint",
    "Ordering: held and released",
    "Duplicates skipped",
    "Poison records by topic",
}


def panel_keys(path: Path) -> set[tuple[str, str]]:
    return {(title, ref) for title, ref, _ in queries(json.loads(path.read_text()))}


def grew(delta: float, w: float) -> Want:
    """A counter that grew by `delta` inside a window of `w` s, as increase() shows it: the span
    sampled (at least w - 2 s with 1 s scrapes) extrapolated to the window."""
    return (delta * 0.95, delta * w / (w - 2.5))


def controls(eps: dict[str, str], w: float) -> dict[tuple[str, str], dict[str, Want]]:
    def per_s(delta: float) -> Want:
        lo, hi = grew(delta, w)
        return (lo / w, hi / w)

    return {
        ("Open circuit breakers", "A"): {"": exactly(1)},
        ("Circuit breaker state by endpoint", "A"): {f"endpoint={eps['brk']}": exactly(2)},
        ("Endpoints auto-disabled (time range)", "A"): {"": grew(1, w)},
        ("Ordering: blocked sequences", "A"): {"": exactly(0)},  # all released (1 while held: below)
        # Each of the K - 1 reserves a slot; one that comes back long after its slot is judged again.
        ("Deliveries throttled by endpoint", "A"): {
            f"endpoint={eps['thr']}": (per_s(THR_K - 1)[0], per_s(2 * (THR_K - 1))[1])
        },
        ("Deliveries filtered out by endpoint", "A"): {f"endpoint={eps['flt']}": per_s(1)},
        ("Filter errors by endpoint", "A"): {f"endpoint={eps['err']}": per_s(1)},
        ("Ordering: held and released", "A"): {f"endpoint={eps['ord']}": per_s(2)},
        ("Ordering: held and released", "B"): {"": per_s(2)},
        ("Duplicates skipped", "A"): {"": exactly(0)},
        ("Poison records by topic", "A"): {"sum": per_s(1), "*": per_s(1)},
    }


def controls_tick(p: Producer, tag: str) -> None:
    p.emit("lead.created", f"l1{tag}", {"id": f"l1{tag}", "status": "1", "total": "5"}, flush=False)
    p.emit("lead.created", f"l2{tag}", {"id": f"l2{tag}", "status": "2", "total": {"a": "1"}}, flush=False)
    for k in range(THR_K):
        p.emit("estimate.updated", f"e{k}{tag}", {"id": f"e{k}{tag}"}, flush=False)
    for seq in (1, 2, 3):
        p.emit("invoice.updated", f"head{tag}", {"id": f"head{tag}", "seq": seq}, flush=False)
    p.send("webhooks.deliveries", f"poison{tag}", b"{not a delivery")


def test_every_controls_panel_shows_the_value_its_load_implies(
    prometheus_bin: str, settings: Settings, receiver: Receiver, workers, tmp_path: Path
) -> None:
    seen_heads: set[str] = set()

    def head_first_attempt(_n: int, body: bytes) -> Reply:
        payload = json.loads(body)["payload"]
        rid = payload["id"]
        if payload["seq"] == 1 and rid not in seen_heads:
            seen_heads.add(rid)
            return Reply(503, headers={"Retry-After": str(HEAD_WAIT[rid[len("head"):]])})
        return Reply(200)

    receiver.on_body("/ord", head_first_attempt)
    receiver.on("/brk", lambda _n: Reply(500))
    eps = {
        "flt": register(settings, receiver, "/flt", "lead.*", "immediate", filter={"payload.status": "2"}),
        "err": register(settings, receiver, "/err", "lead.*", "immediate", filter={"payload.total": {"$gt": 0}}),
        "thr": register(settings, receiver, "/thr", "estimate.*", "immediate", max_rate=THR_RATE),
        "ord": register(settings, receiver, "/ord", "invoice.*", "async", ordering="resource"),
        "brk": register(settings, receiver, "/brk", "contract.*", "immediate"),
    }
    ids = {role: ep.id for role, ep in eps.items()}
    # Warm-up (produced first: the worker reads it as it comes up): every labelled series exists,
    # and was scraped, before phase C.
    with Producer(settings) as p:
        controls_tick(p, "w")
    w: WorkerProcess = workers(
        WEBHOOKS_RETRY_SCHEDULE="300ms,300ms",
        WEBHOOKS_BREAKER_FAILURES=str(BREAKER_FAILURES),
        WEBHOOKS_BREAKER_FAILURE_RATE="0",
        WEBHOOKS_BREAKER_COOLDOWN="300s",
        WEBHOOKS_AUTO_DISABLE_AFTER=f"{AUTO_DISABLE:g}s",
    )
    prom = Prometheus(f"127.0.0.1:{w.port}", tmp_path)
    path = ROOT / "grafana" / "dashboards" / "perfex-webhooks-overview.json"
    expr = {(t, r): e for t, r, e in queries(json.loads(path.read_text()))}
    try:
        prom.wait_ready()

        def scraped_after(t: float) -> bool:
            doc = prom.query('timestamp(up{job="perfex-webhooks"} == 1)')
            return bool(doc["data"]["result"]) and float(doc["data"]["result"][0]["value"][1]) > t

        def released(n: int) -> Callable[[], bool]:
            return lambda: metric(w.metrics(), "webhooks_ordering_released_total") == n

        def warmed_up() -> bool:
            text = w.metrics()
            return (
                metric(text, "webhooks_ordering_released_total") == 2
                and metric(text, "webhooks_deliveries_filtered_out_total") == 1
                and metric(text, "webhooks_filter_errors_total") == 1
                and metric(text, "webhooks_poison_records_total") == 1
                and len(receiver.received("/thr")) == THR_K
            )

        # The warm-up's last counts are in (a settle's quiet period is not needed: phase C's window
        # is checked against what changed inside it, and settle() ends phase C).
        eventually(warmed_up, 60, "the warm-up counted")
        t0 = time.time()
        eventually(lambda: scraped_after(t0), 10, "a scrape before phase C")

        # Phase C: one tick and the broken endpoint.
        with Producer(settings) as p:
            controls_tick(p, "c")
            p.emit("contract.updated", "c1", {"id": "c1"})
        # While the head waits out its Retry-After, its resource's sequence is blocked.
        blocked = substitute(expr[("Ordering: blocked sequences", "A")], GRAFANA_VARS)
        eventually(
            lambda: not check_query(prom, "blocked", blocked, {"": exactly(1)}, time.time()),
            HEAD_WAIT["c"] + 5,
            "the blocked sequence on the panel",
        )
        # Failing for AUTO_DISABLE s with its breaker open: the next delivery it holds disables it.
        brk = eventually(
            lambda: (b := w.api("GET", f"/api/endpoints/{ids['brk']}/breaker").json())["state"] == "open" and b,
            30,
            "the broken endpoint's breaker open",
        )
        eventually(lambda: time.time() > brk["failing_since"] + AUTO_DISABLE + 0.2, 5, "failing long enough")
        with Producer(settings) as p:
            p.emit("contract.updated", "c2", {"id": "c2"})
        settle(
            w,
            accounted=lambda: released(4)()
            and metric(w.metrics(), "webhooks_endpoints_auto_disabled_total") == 1
            and len(receiver.received("/thr")) == 2 * THR_K,
        )
        t1 = time.time()
        eventually(lambda: scraped_after(t1), 10, "a scrape after phase C")
        at = time.time()
        window = math.ceil(at - t0) + 1
        grafana = {**GRAFANA_VARS, "__rate_interval": f"{window}s", "__range": f"{window}s"}
        skip = {key for key in panel_keys(path) if key[0] not in CONTROL_PANELS}
        problems = check_dashboard(prom, path, lambda b: controls(ids, window), at, grafana, skip)
        # What the load did, from the receivers: the counts the panels were checked against.
        got = {role: [x.json["payload"]["id"] for x in receiver.received(f"/{role}")] for role in ("flt", "err")}
        assert got == {"flt": ["l2w", "l2c"], "err": ["l1w", "l1c"]}, got
        assert w.api("GET", f"/api/endpoints/{ids['brk']}").json()["enabled"] is False
        if problems:
            keep_for_inspection(tmp_path, "prometheus-controls")
        assert not problems, f"controls panels off (window {window}s):\n" + "\n".join(problems)
    finally:
        prom.stop()
