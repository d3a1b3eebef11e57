"""deploy/ and grafana/ checked against the app, statically (tests/test_containers.py runs them).

What is checked: every YAML/JSON file parses; Kubernetes manifests validate against Kubernetes'
own schemas (kubernetes-validate, offline); every command line names a real `perfex-webhooks`
subcommand and its options (click introspection of app.cli.main); every environment variable given
to our containers is one the app reads (string literals in app/*.py, Settings.from_env in
app/config.py); every port is the app's web port and every probe path a route of app/web.py;
every metric name used anywhere is in app.metrics.REGISTRY; the KEDA trigger names the app's
consumer group and topics; compose wires Prometheus and Grafana to the files that exist.
What runs for real under podman is in tests/test_containers.py; Grafana and KEDA do not run
(docs/operations.md).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml

from app.cli import main
from app.config import Settings
from app.metrics import REGISTRY
from app.topics import load_specs
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GRAFANA = ROOT / "grafana"
IMAGE = "ghcr.io/example/perfex-webhooks"


def load_yaml(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in load_yaml(p) if d.get("kind") != "Kustomization"]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "docker-compose.yml")[0]


def app_env_vars() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "app").glob("*.py"):
        names |= set(re.findall(r"[\"']((?:KAFKA|WEBHOOKS)_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def metric_names() -> set[str]:
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for fam in REGISTRY.collect():
        names.add(fam.name)
        names.update(fam.name + s for s in suffixes.get(fam.type, ()))
    return names


def check_command(args: list[str]) -> None:
    """Fail unless args is a real subcommand path with real options, e.g. ['topics', 'apply', ...]."""
    cmd: click.Command = main
    ctx = click.Context(main)
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{args}: no subcommand {rest[0]!r} of {cmd.name!r}"
        cmd, rest = sub, rest[1:]
    assert not isinstance(cmd, click.Group), f"{args}: {cmd.name!r} needs a subcommand"
    options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for token in rest:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in options, f"{args}: {cmd.name!r} has no option {token}"


# ---- everything parses ------------------------------------------------------------------------
def test_every_yaml_and_json_parses() -> None:
    files = [
        *DEPLOY.rglob("*.yml"),
        *DEPLOY.rglob("*.yaml"),
        *GRAFANA.rglob("*.yml"),
        *GRAFANA.rglob("*.json"),
    ]
    assert len(files) >= 12
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_yaml(path), f"{path} is empty"


def test_kubernetes_manifests_match_the_schemas() -> None:
    import kubernetes_validate  # a test dependency: missing is a failure
    version = kubernetes_validate.latest_version()
    kinds = set()
    for doc in k8s_docs():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_keda_scales_on_the_apps_consumer_group
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Job", "ScaledObject"} <= kinds
    assert "Secret" not in kinds  # generated from the operator's secrets.env: no token ships
    listed = load_yaml(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# ---- commands, env vars, ports, probes ------------------------------------------------------------
def test_dockerfile_runs_a_real_command() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["perfex-webhooks"]
    check_command(cmd)
    # Users get python:3.11-slim; the tests build on a local Debian base (tests/test_containers.py).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^EXPOSE (\d+)$", text, re.M).group(1) == str(Settings().web_port)  # type: ignore[union-attr]
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for name in src.split():
            assert (ROOT / name).exists(), f"Dockerfile copies {name}, which is not in the repository"
    env_block = re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)
    env_names = {m for block in env_block for m in re.findall(r"\b([A-Z][A-Z0-9_]+)=", block)}
    ours = {n for n in env_names if n.startswith(("WEBHOOKS_", "KAFKA_"))}
    assert ours and ours <= app_env_vars(), ours - app_env_vars()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!app/" in ignore and "!topics.yaml" in ignore


def test_commands_env_vars_and_ports_exist_in_the_app() -> None:
    known_env = app_env_vars()
    port = Settings().web_port
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("perfex-webhooks")}
    assert set(ours) == {"topics", "worker"}
    for name, svc in ours.items():
        check_command(svc["command"])
        unknown = set(svc["environment"]) - known_env
        assert not unknown, f"compose service {name}: env vars the app does not read: {unknown}"
        assert svc["environment"]["WEBHOOKS_WEB_PORT"] == str(port)
    assert ours["topics"]["command"][:2] == ["topics", "apply"]
    assert ours["worker"]["expose"] == [str(port)]
    assert all(p.endswith(f":{port}") for p in ours["worker"]["ports"])

    config = {k for cm in by_kind("ConfigMap") for k in cm["data"]}
    (generated,) = load_yaml(K8S / "kustomization.yaml")[0]["secretGenerator"]
    assert generated["envs"] == ["secrets.env"] and "deploy/k8s/secrets.env" in (ROOT / ".gitignore").read_text()
    assert not config - known_env, config - known_env
    assert not {"WEBHOOKS_ADMIN_TOKEN", "WEBHOOKS_METRICS_TOKEN"} & set(config)
    assert by_kind("ConfigMap")[0]["data"]["WEBHOOKS_WEB_PORT"] == str(port)

    routes = set(re.findall(r'add_get\("(/[a-z]+)"', (ROOT / "app" / "web.py").read_text()))
    assert {"/ready", "/health", "/metrics"} <= routes
    cm_names = {cm["metadata"]["name"] for cm in by_kind("ConfigMap")}
    secret_names = {generated["name"]}
    pods = [d["spec"]["template"]["spec"] for d in by_kind("Deployment") + by_kind("Job")]
    for pod in pods:
        for c in pod["containers"]:
            assert c["image"].startswith(IMAGE), c["image"]
            check_command(c["args"])
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in cm_names
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secret_names
            assert not {e["name"] for e in c.get("env", [])} - known_env
    (worker,) = by_kind("Deployment")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "worker"
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
    assert {"secretRef": {"name": "perfex-webhooks"}} in c["envFrom"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] in routes
    (svc,) = by_kind("Service")
    assert svc["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port]
    (job,) = by_kind("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["topics", "apply"]


def test_keda_scales_on_the_apps_consumer_groups() -> None:
    (so,) = by_kind("ScaledObject")
    (worker,) = by_kind("Deployment")
    (cm,) = by_kind("ConfigMap")
    settings = Settings.from_env(cm["data"])
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    partitions = {s.name: s.partitions for s in load_specs()}
    topics = set()
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "kafka"
        meta = trig["metadata"]
        assert meta["bootstrapServers"] == settings.bootstrap_servers
        logical = meta["topic"].removeprefix(settings.topic_prefix)
        # The group that consumes the topic: Faust's for crm.events, the delivery agent's (app/consumers/deliveries.py) for webhooks.deliveries.
        group = settings.group_id + (".deliveries" if logical == "webhooks.deliveries" else "")
        assert meta["consumerGroup"] == group, logical
        assert logical in partitions, meta["topic"]
        assert so["spec"]["maxReplicaCount"] <= partitions[logical]
        assert int(meta["lagThreshold"]) > 0
        topics.add(logical)
    assert topics == {"crm.events", "webhooks.deliveries"}  # what the two agents consume
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


# ---- compose wiring: Kafka, Prometheus, Grafana -----------------------------------------------
def test_compose_kafka_prometheus_grafana() -> None:
    c = compose()
    services = c["services"]
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.0.2"
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper
    assert "zookeeper" not in json.dumps(c).lower()
    bootstrap = services["worker"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert f"INTERNAL://{bootstrap}" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    worker = services["worker"]
    assert "container_name" not in worker  # `--scale worker=N`
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"

    prom = services["prometheus"]
    mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    prom_file = (DEPLOY / mount.split(":")[0]).resolve()
    (scrape,) = load_yaml(prom_file)[0]["scrape_configs"]
    (sd,) = scrape["dns_sd_configs"]
    assert set(sd["names"]) & {"worker", "tasks.worker"}
    assert sd["port"] == Settings().web_port and scrape.get("metrics_path", "/metrics") == "/metrics"
    assert scrape["authorization"]["credentials_file"] == "metrics-token"  # WEBHOOKS_METRICS_TOKEN
    assert "/etc/prometheus/metrics-token" in prom["command"][0]
    promtool = require_tool("promtool")
    # promtool wants the token file to exist: check a copy next to a stand-in token.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(prom_file, Path(tmp) / "prometheus.yml")
        (Path(tmp) / "metrics-token").write_text("x" * 32)
        out = subprocess.run(
            [promtool, "check", "config", str(Path(tmp) / "prometheus.yml")], capture_output=True, text=True
        )
    assert out.returncode == 0, out.stdout + out.stderr

    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] if v.endswith(":ro") else v.split(":", 1) for v in grafana["volumes"])
    provisioning = (DEPLOY / next(k for k, v in mounts.items() if v == "/etc/grafana/provisioning")).resolve()
    assert provisioning == GRAFANA / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "perfex-webhooks.yml")[0]["providers"]
    dash_src = next(k for k, v in mounts.items() if v == provider["options"]["path"])
    assert (DEPLOY / dash_src).resolve() == GRAFANA / "dashboards"
    (ds,) = load_yaml(provisioning / "datasources" / "prometheus.yml")[0]["datasources"]
    assert ds["url"] == "${PROMETHEUS_URL}" and "PROMETHEUS_URL" in grafana["environment"]
    assert grafana["environment"]["PROMETHEUS_URL"].endswith(":9090")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).exists()


def test_grafana_dashboards_are_well_formed() -> None:
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"]
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["schemaVersion"] >= 36, path.name
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["current"]["value"] == ds["uid"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in d["panels"]:
            assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], f"{path.name}: panel {p['title']!r} has no query"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"])
    endpoint = json.loads((GRAFANA / "dashboards" / "perfex-webhooks-endpoint.json").read_text())
    (var,) = [v for v in endpoint["templating"]["list"] if v["name"] == "endpoint"]
    assert var["query"]["query"] == "label_values(webhooks_deliveries_total, endpoint)"


def test_every_metric_name_mentioned_exists() -> None:
    known = metric_names()
    files = [
        *GRAFANA.rglob("*.json"),
        *DEPLOY.rglob("*.y*ml"),
        ROOT / "docs" / "operations.md",
    ]
    seen = set()
    for path in files:
        if not path.exists():
            continue
        for name in re.findall(r"\bwebhooks_[a-z0-9_]+\b", path.read_text()):
            seen.add(name)
            assert name in known, f"{path.relative_to(ROOT)} mentions metric {name}, not in app.metrics"
    assert {"webhooks_dlq_size", "webhooks_consumer_lag", "webhooks_deliveries_total"} <= seen


def test_docs_commands_exist() -> None:
    """Every `perfex-webhooks ...` command line in docs/operations.md is a real command."""
    text = (ROOT / "docs" / "operations.md").read_text()
    lines = re.findall(r"^\s*(?:\$ )?perfex-webhooks ([a-z][^\n#|]*)", text, re.M)
    assert lines
    for line in lines:
        args = [a for a in shlex.split(line.replace("...", "")) if not a.startswith("<")]
        check_command([a for a in args if a != "\\"])
