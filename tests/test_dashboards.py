"""Every Grafana panel shows the value a known load implies, from a real Prometheus scraping a real
worker (not merely "some data": 0, NaN or a wrong label selector fail).

Prometheus is Debian's `prometheus` (scripts/bootstrap installs it) with its own config and TSDB in
a temp dir, scraping the worker every second. The load is steady and designed (see `Load`): every
kind of series the dashboards show has a rate that follows from the pace of the load, which is
measured from the worker's own count, so each panel's value is asserted within a tolerance. Grafana's
own variables are replaced the way Grafana would ($__rate_interval = 4 x scrape interval, rounded
up); `$endpoint` is replaced by every value its label_values() query returns. The `or ... * 0`
branches (0 instead of "no data" for an endpoint that never succeeded) are checked on their own.
"""

from __future__ import annotations

import json
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

from app.config import Settings
from app.dlq import read_view
from app.producer import Producer
from tests.helpers import (
    eventually,
    metric,
    metric_value,
    parse_metrics,
    register,
    register_load_endpoints,
    require_tool,
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


# ---- the load: steady, so that every panel has a value we can work out ---------------------------------
# Every TICK the load emits, on fresh resources: 2 x invoice.updated of one invoice (smart collapses
# them), 1 x lead.created, 1 x customer.updated (to an endpoint that answers after SLOW s) and one
# record that is not JSON. Once, at the start, 1 x lead.deleted (to the endpoint that answers 410).
# Endpoints (tests/helpers.register_load_endpoints + "slow"): immediate "invoice.*,lead.*", async
# "invoice.*,lead.*", smart "invoice.*", fail "lead.created" (immediate, always 500, 3 tiers: 4
# attempts then the DLQ), gone "lead.deleted" (410), slow "customer.*" (async, SLOW s).
TICK = 0.5
SLOW = 2.0
SMART_WINDOW = 1.0
STEADY = 16.0  # seconds of load before the values are read (the 15 s rate window is then full)
REL = 0.35  # tolerance of a rate: ticks are paced on 2 shared cores, scrapes every second
# Per tick, by design: attempts per endpoint role and outcome.
ATTEMPTS = {
    "immediate": {"immediate": 3},  # role -> {mode: successes}
    "async": {"async": 3},
    "smart": {"smart": 1},
    "slow": {"async": 1},
}
FAILED = 4  # the fail endpoint: 1 lead x 4 attempts (mode immediate, HTTP 500)
SUCCESS = sum(n for modes in ATTEMPTS.values() for n in modes.values())  # 8
TOTAL = SUCCESS + FAILED  # 12


class Load:
    """The steady load in a thread; `ticks` holds the time of each tick."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ticks: list[float] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="dashboard-load")

    def _run(self) -> None:
        try:
            with Producer(self.settings) as p:
                p.emit("lead.deleted", "gone1", {"id": "gone1"})
                t0 = time.monotonic()
                while not self._stop.is_set():
                    n = len(self.ticks)
                    for k in range(2):
                        p.emit("invoice.updated", f"inv{n}", {"id": f"inv{n}", "k": str(k)}, flush=False)
                    p.emit("lead.created", f"lead{n}", {"id": f"lead{n}"}, flush=False)
                    p.emit("customer.updated", f"cus{n}", {"id": f"cus{n}"}, flush=False)
                    p.send("crm.events", f"invoice:bad{n}", b"{not json")
                    p.flush()
                    self.ticks.append(time.time())
                    self._stop.wait(max(0.0, t0 + (n + 1) * TICK - time.monotonic()))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)


def tick_rate(w: WorkerProcess, seconds: float) -> float:
    """Ticks per second the pipeline took in over the last `seconds`, from the worker's own count of
    one event per tick (the machine is shared: the load's pace is measured, its shape is designed)."""

    def count() -> float:
        return metric(w.metrics(), "webhooks_events_consumed_total", event="customer.updated")

    t0, c0 = time.monotonic(), count()
    time.sleep(seconds)
    return (count() - c0) / (time.monotonic() - t0)


Want = tuple[float, float]  # the accepted range of a series' value


def around(x: float, rel: float = REL) -> Want:
    return (x * (1 - rel), x * (1 + rel))


def overview(r: float, dlq: float, state: dict[str, float]) -> dict[tuple[str, str], dict[str, Want]]:
    """(panel, refId) -> {series labels as 'k=v,...' ('' for a single unlabelled series): range}.
    r = ticks/s; dlq and state: what the worker's /metrics said at the time of the queries."""
    lag = (1.0, 40.0)  # Little: ~r x SLOW slow deliveries open (+ those queued behind them)
    return {
        ("Events in /s", "A"): {"": around(4 * r)},
        ("Deliveries /s", "A"): {"": around(SUCCESS * r)},
        ("Success ratio", "A"): {"": around(SUCCESS / TOTAL, 0.15)},
        ("DLQ size", "A"): {"": (dlq - 2 * r - 2, dlq + 2)},
        ("Consumer lag", "A"): {"": lag},
        ("Workers", "A"): {"": (1, 1)},
        ("Events consumed by event", "A"): {
            "event=invoice.updated": around(2 * r),
            "event=lead.created": around(r),
            "event=customer.updated": around(r),
            "event=lead.deleted": (0, 0),  # once, before the window
        },
        ("HTTP attempts by outcome", "A"): {
            "outcome=success": around(SUCCESS * r),
            "outcome=http_error": around(FAILED * r),
            "outcome=gone": (0, 0),
        },
        ("Success ratio by mode", "A"): {
            "mode=immediate": around(3 / 7, 0.2),
            "mode=async": (1, 1),
            "mode=smart": (1, 1),
        },
        ("Throughput by mode", "A"): {
            "mode=immediate": around(7 * r),
            "mode=async": around(4 * r),
            "mode=smart": around(r),
        },
        # Latency: lower bounds follow from the design (the smart window, the slow endpoint's
        # delay; histogram_quantile interpolates inside the bucket around them), no timing is judged.
        **{
            ("End-to-end latency by mode", ref): {
                "mode=immediate": (1e-6, 30),
                "mode=async": (SLOW, 30) if ref != "A" else (1e-6, 30),  # 1 in 4 async is slow
                "mode=smart": (SMART_WINDOW, 30),
            }
            for ref in "ABC"
        },
        **{
            ("HTTP attempt latency by mode", ref): {
                "mode=immediate": (1e-6, 30),
                "mode=async": (1.0, 30) if ref != "A" else (1e-6, 30),  # bucket (1, 2.5] holds SLOW
                "mode=smart": (1e-6, 30),
            }
            for ref in "ABC"
        },
        ("Retries scheduled per tier", "A"): {f"tier={t}": around(r) for t in ("30s", "1m", "5m")},
        ("DLQ size", "B"): {"": (dlq - 2 * r - 2, dlq + 2)},  # the time series of the same gauge
        ("DLQ entries by reason", "A"): {"reason=retries_exhausted": around(r), "reason=gone": (0, 0)},
        ("Invalid input by reason", "A"): {"reason=not_json": around(r)},
        ("Replays (time range)", "A"): {"": (0.9, 1.6)},  # one replay; increase() extrapolates a little
        ("Endpoints disabled by 410 (time range)", "A"): {"": (0.9, 1.6)},
        ("Endpoints by state", "A"): {"state=enabled": (5, 5), "state=disabled": (1, 1)},
        ("Smart collapse ratio", "A"): {"": around(2.0, 0.25)},
        ("Smart deliveries and merged events", "A"): {"": around(r)},
        ("Smart deliveries and merged events", "B"): {"": around(2 * r)},
        ("Smart items pending", "A"): {"*": (1, 2 * SMART_WINDOW / TICK + 1)},  # ~window/tick open
        ("Consumer lag by topic", "A"): {"topic=webhooks.deliveries": lag, "*": (0, 40)},
        ("HTTP requests in flight", "A"): {"*": (1, 3 * SLOW * r + 2)},  # Little: ~r x SLOW
    }


def endpoint_view(role: str, r: float, attempts: float) -> dict[tuple[str, str], dict[str, Want]]:
    """The endpoint dashboard for one endpoint; `attempts` = its attempt count per /metrics."""
    ok = sum(ATTEMPTS.get(role, {}).values())
    failed = FAILED if role == "fail" else 0
    modes = ATTEMPTS.get(role) or {"immediate": FAILED}
    ratio = (1, 1) if ok else (0, 0)  # the fail endpoint takes the `or ... * 0` branch: 0, not "no data"
    total = attempts * 0.6, attempts * 1.1  # increase() over the run: the first sample of a new series is its base
    return {
        ("Success ratio", "A"): {"": ratio},
        ("Attempts (time range)", "A"): {"": total},
        # Endpoints that never failed take the masked branch: exactly 0.
        ("Failed attempts (time range)", "A"): {"": total if failed else (0, 0)},
        ("Share of all attempts", "A"): {"": around((ok + failed) / TOTAL, 0.25)},
        ("Attempts by outcome", "A"): (
            {"outcome=success": around(ok * r)} if ok else {"outcome=http_error": around(failed * r)}
        ),
        ("Success ratio over time", "A"): {"": ratio},
        ("Attempts by mode", "A"): {f"mode={m}": around(n * r) for m, n in modes.items()},
        ("Attempts by worker", "A"): {"*": around((ok + failed) * r)},
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
    for key, (lo, hi) in want.items():
        if key == "*":
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


def check_dashboard(
    prom: Prometheus, path: Path, expect: Callable[[dict[str, str]], dict[tuple[str, str], dict[str, Want]]], at: float
) -> list[str]:
    """Every query of a dashboard, for every value of its variables, against its expected values."""
    dash = json.loads(path.read_text())
    variables = variable_values(prom, dash)
    problems = [f"{path.name}: variable ${n} has no values" for n, v in variables.items() if not v]
    passes: list[dict[str, str]] = [{}]
    for name, values in variables.items():
        passes = [{**p, name: v} for p in passes for v in values] or passes
    for bindings in passes:
        values = {**GRAFANA_VARS, "datasource": "prometheus", **bindings}
        wants = expect(bindings)
        seen = set()
        for title, ref, expr in queries(dash):
            where = f"{path.name} / {title!r} / {ref} {bindings or ''}"
            seen.add((title, ref))
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


def test_every_panel_shows_the_value_the_load_implies(
    prometheus_bin: str, settings: Settings, receiver: Receiver, workers, tmp_path: Path
) -> None:
    eps = register_load_endpoints(settings, receiver, fail="immediate")
    receiver.on("/slow", lambda n: Reply(200, delay=SLOW))
    eps["slow"] = register(settings, receiver, "/slow", "customer.*", "async")
    roles = {ep.id: role for role, ep in eps.items()}
    w: WorkerProcess = workers(
        WEBHOOKS_RETRY_SCHEDULE="100ms,100ms,100ms",
        WEBHOOKS_SMART_WINDOW=f"{SMART_WINDOW:g}s",
        WEBHOOKS_SMART_MAX_WAIT="5s",
    )
    workdir = Path(tmp_path)
    prom = Prometheus(f"127.0.0.1:{w.port}", workdir)
    load = Load(settings)
    try:
        prom.wait_ready()
        # Scrape a baseline first, so rate() and increase() see the counters grow.
        deadline = time.monotonic() + 20
        while not prom.query('up{job="perfex-webhooks"} == 1')["data"]["result"]:
            assert time.monotonic() < deadline, f"prometheus never scraped the worker; see {prom.log_path}"
            time.sleep(0.2)
        load.thread.start()
        # One replay (of a lead parked by the failing endpoint), well inside the time range.
        dlv = eventually(lambda: next(iter(read_view(settings)), None), 30, "a first DLQ entry")
        r = w.api("POST", f"/api/dlq/{dlv}/replay")
        assert r.status_code == 200 and r.json()["replayed"] == 1, r.text
        time.sleep(max(0.0, STEADY - 15 - (time.time() - load.ticks[0])))
        rate = tick_rate(w, 15.0)  # the same 15 s as $__rate_interval
        assert rate > 0.5, f"the pipeline took in {rate:.2f} ticks/s (designed: {1 / TICK:g})"
        at = time.time() - 1.0  # the last complete scrape
        text = w.metrics()
        samples = parse_metrics(text)
        dlq = metric(text, "webhooks_dlq_size")
        state = {s: metric(text, "webhooks_endpoints", state=s) for s in ("enabled", "disabled")}
        per_ep = {
            ep_id: metric_value(samples, "webhooks_deliveries_total", endpoint=ep_id) or 0.0 for ep_id in roles
        }
        problems: list[str] = []
        for path in DASHBOARDS:
            if path.name == "perfex-webhooks-endpoint.json":
                # The 410 endpoint had one attempt before the window: its rates are all 0 (checked
                # in the overview); here the endpoints that get traffic all the time.
                def expect(b: dict[str, str]) -> dict[tuple[str, str], dict[str, Want]]:
                    role = roles.get(b["endpoint"], "?")
                    return endpoint_view(role, rate, per_ep.get(b["endpoint"], 0.0)) if role != "gone" else {}

                dash = json.loads(path.read_text())
                assert set(variable_values(prom, dash)["endpoint"]) == set(roles)
                for tpl in dash["templating"]["list"]:
                    if tpl["name"] == "endpoint":
                        tpl["query"] = "label_values(webhooks_deliveries_total{outcome!=\"gone\"}, endpoint)"
                steady = tmp_path / path.name
                steady.write_text(json.dumps(dash))
                problems += check_dashboard(prom, steady, expect, at)
            else:
                problems += check_dashboard(prom, path, lambda b: overview(rate, dlq, state), at)
        # The masked branch (`or ... * 0`) of the overview: 0 for an endpoint that never succeeded.
        dash = json.loads((ROOT / "grafana" / "dashboards" / "perfex-webhooks-overview.json").read_text())
        for title, ref, expr in queries(dash):
            if "* 0" in expr:
                q = substitute(masked(expr, eps["fail"].id), GRAFANA_VARS)
                problems += check_query(prom, f"masked {title!r}/{ref}", q, {"*": (0, 0)}, at)
        if problems:
            keep = OUTPUT / "prometheus-dashboards"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(workdir, keep, ignore=shutil.ignore_patterns("data"))
        assert not problems, f"at {rate:.2f} ticks/s, dashboard values off:\n" + "\n".join(problems)
        assert load.error is None, load.error
    finally:
        load.stop()
        prom.stop()
