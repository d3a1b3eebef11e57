"""Every Grafana panel query returns data from a real Prometheus scraping a real worker under load.

Prometheus is Debian's `prometheus` (scripts/bootstrap installs it) with its own config and TSDB in
a temp dir, scraping the worker every second. The load covers every kind of series the dashboards
show: success in every mode, smart bursts, an always-failing endpoint with a compressed retry
schedule (so tier and DLQ series exist), a 410 endpoint and invalid records. Grafana's own
variables are replaced the way Grafana would ($__rate_interval = 4 x scrape interval, rounded up);
`$endpoint` is replaced by every value its label_values() query returns.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.helpers import produce_load, register_load_endpoints, require_tool
from tests.receiver import Receiver
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

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.post(self.base + "/api/v1/query", data={"query": expr}, timeout=10)
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


def check_all(prom: Prometheus) -> list[str]:
    """Every problem with every query of every dashboard, right now."""
    problems = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        variables = variable_values(prom, dash)
        for name, values in variables.items():
            if not values:
                problems.append(f"{path.name}: variable ${name} has no values")
        # One pass per combination is overkill; one pass per value of each variable suffices here.
        passes: list[dict[str, str]] = [{}]
        for name, values in variables.items():
            passes = [{**p, name: v} for p in passes for v in values] or passes
        for bindings in passes:
            values = {**GRAFANA_VARS, "datasource": "prometheus", **bindings}
            for title, ref, expr in queries(dash):
                where = f"{path.name} / {title!r} / {ref} {bindings or ''}"
                try:
                    q = substitute(expr, values)
                except KeyError as exc:
                    problems.append(f"{where}: {exc}")
                    continue
                doc = prom.query(q)
                if doc.get("status") != "success":
                    problems.append(f"{where}: invalid query {q!r}: {doc.get('error')}")
                elif not doc["data"]["result"]:
                    problems.append(f"{where}: no series for {q!r}")
    return problems


def test_dashboards_exist() -> None:
    names = {p.name for p in DASHBOARDS}
    assert {"perfex-webhooks-overview.json", "perfex-webhooks-endpoint.json"} <= names
    for path in DASHBOARDS:
        assert list(queries(json.loads(path.read_text()))), f"{path.name} has no queries"


def test_every_panel_query_returns_data(
    prometheus_bin: str, settings: Settings, receiver: Receiver, workers, tmp_path: Path
) -> None:
    eps = register_load_endpoints(settings, receiver, fail="immediate")
    w: WorkerProcess = workers(
        WEBHOOKS_RETRY_SCHEDULE="100ms,100ms,100ms",
        WEBHOOKS_SMART_WINDOW="300ms",
        WEBHOOKS_SMART_MAX_WAIT="5s",
    )
    workdir = Path(tmp_path)
    prom = Prometheus(f"127.0.0.1:{w.port}", workdir)
    try:
        prom.wait_ready()
        # Scrape a baseline first, so rate() and increase() see the counters grow.
        deadline = time.monotonic() + 20
        while not prom.query('up{job="perfex-webhooks"} == 1')["data"]["result"]:
            assert time.monotonic() < deadline, f"prometheus never scraped the worker; see {prom.log_path}"
            time.sleep(0.2)
        load = produce_load(settings, eps)
        receiver.wait_for(4 * 3, "/fail", timeout=30)  # 3 leads x (first attempt + 3 tiers): then DLQ
        receiver.wait_for(load.events, "/async", timeout=30)
        problems = check_all(prom)
        deadline = time.monotonic() + 30
        while problems and time.monotonic() < deadline:
            time.sleep(1)
            problems = check_all(prom)
        if problems:
            keep = OUTPUT / "prometheus-dashboards"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(workdir, keep, ignore=shutil.ignore_patterns("data"))
        assert not problems, "dashboard queries without data:\n" + "\n".join(problems)
    finally:
        prom.stop()
