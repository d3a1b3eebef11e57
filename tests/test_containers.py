"""deploy/ run for real under podman: the image, the compose stack and the Kubernetes manifests.

Registries of images cannot be reached on our machines, so every image is built here on a local
Debian base (scripts/base-image, debootstrap, cached per day): the worker image from
deploy/Dockerfile (BASE_IMAGE), and, for the compose stack only, Kafka 4.0.2 from the same Maven
jars as the test broker and Prometheus from Debian's package (tests/containers/compose.test.yml).
podman's layer cache makes a second run's builds take seconds.

One compose stack serves the module: Kafka, `topics apply`, two worker replicas and Prometheus;
the Kubernetes manifests then run under `podman kube play` on the stack's network, pointed at its
Kafka container. Marked `containers`: `pytest -m "not containers"` leaves them out of a quick loop.
podman 4.3 (Debian bookworm) cannot wait for `service_healthy` and mishandles `--requires` chains
of scaled services, so the stack comes up service by service (`up --no-deps`), each waited for.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.config import Settings
from app.producer import Producer
from tests.containers.images import COMPOSE_FILES, DEPLOY, ROOT, WORKER_IMAGE, build_all, run
from tests.helpers import eventually
from tests.receiver import Receiver

# Cold, the image builds take ~10 min on 2 busy cores (docs/operations.md); cached, seconds.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

PORT = Settings().web_port
EVENTS = 20


def answers(probe: Callable[[], Any]) -> Callable[[], Any]:
    """probe() for eventually(), with a refused or reset connection (still starting) as False."""

    def call() -> Any:
        try:
            return probe()
        except (httpx.HTTPError, OSError):
            return False

    return call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    if shutil.which("podman") is None:
        pytest.fail('podman is missing: scripts/bootstrap installs it (or deselect: -m "not containers")')
    return build_all()


def inspect(name: str) -> dict[str, Any]:
    return json.loads(run("podman", "inspect", name).stdout)[0]


def address(container: str) -> str:
    nets = inspect(container)["NetworkSettings"]["Networks"]
    (net,) = nets.values()
    return str(net["IPAddress"])


class Stack:
    """One `podman-compose` project; every command names it, so nothing else on the machine is touched."""

    def __init__(self) -> None:
        self.project = f"pwh{uuid.uuid4().hex[:8]}"
        self.kafka_port = free_port()
        # What an operator puts in deploy/.env (and deploy/k8s/secrets.env): long random tokens.
        self.token = secrets.token_urlsafe(32)
        self.metrics_token = secrets.token_urlsafe(32)
        self.env = {
            **os.environ,
            "WEBHOOKS_ADMIN_TOKEN": self.token,
            "WEBHOOKS_METRICS_TOKEN": self.metrics_token,
            "WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",  # the receiver is on the host
            "KAFKA_HOST_PORT": str(self.kafka_port),
        }
        self.compose_bin = shutil.which("podman-compose", path=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
        assert self.compose_bin, "podman-compose is missing (pip: the test extra of pyproject.toml)"

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
        return run(self.compose_bin, "-p", self.project, *files, *args, env=self.env, timeout=timeout)  # type: ignore[arg-type]

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def leftovers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        found = []
        for kind in ("container", "volume", "network"):
            args = ["-a"] if kind == "container" else []
            out = run("podman", kind, "ls", *args, "--filter", label, "--format", "{{.Name}}" if kind != "container" else "{{.Names}}")
            found += [f"{kind} {n}" for n in out.stdout.split()]
        pods = run("podman", "pod", "ps", "--filter", f"name=^pod_{self.project}$", "--format", "{{.Name}}")
        return found + [f"pod {n}" for n in pods.stdout.split()]


@pytest.fixture(scope="module")
def stack(images: dict[str, str]) -> Iterator[Stack]:
    s = Stack()
    try:
        s.compose("up", "-d", "--no-build", "--no-deps", "kafka")
        settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": f"localhost:{s.kafka_port}"})
        eventually(lambda: kafka_answers(settings), 180, "Kafka (container) on its HOST listener")
        s.compose("up", "-d", "--no-build", "--no-deps", "topics")
        code = run("podman", "wait", s.container("topics"), timeout=180).stdout.strip()
        assert code == "0", run("podman", "logs", s.container("topics"), check=False).stderr[-2000:]
        s.compose("up", "-d", "--no-build", "--no-deps", "worker", "prometheus")  # 2 replicas: compose.test.yml
        yield s
    finally:
        with contextlib.suppress(Exception):
            s.compose("down", "-v", "-t", "10")


def kafka_answers(settings: Settings) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, "log_level": 0})
    try:
        return bool(admin.list_topics(timeout=3).brokers)
    except KafkaException:  # not up yet
        return False


def ready(base: str) -> bool:
    return httpx.get(f"{base}/ready", timeout=3).status_code == 200


def deliver_and_count(api: str, token: str, settings: Settings, n: int) -> list[dict[str, Any]]:
    """Register an endpoint on a host receiver through the admin API at `api`, emit n events from the
    host into the containers' Kafka, return what the receiver got once n arrived."""
    receiver = Receiver(host="0.0.0.0").start()
    try:
        r = httpx.post(
            f"{api}/api/endpoints",
            headers={"Authorization": f"Bearer {token}"},
            json={"url": f"http://host.containers.internal:{receiver.port}/hook", "events": "invoice.*", "mode": "async"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        # The endpoint travels through the registry topic: events emitted before a worker has it
        # would match nothing, so they are sent once the worker that owns them lists it.
        ep_id = r.json()["id"]
        headers = {"Authorization": f"Bearer {token}"}
        eventually(answers(lambda: httpx.get(f"{api}/api/endpoints/{ep_id}", headers=headers, timeout=5).status_code == 200), 60, "the endpoint in the registry")
        with Producer(settings) as p:
            sent = [p.emit("invoice.paid", str(i), {"id": str(i)}, flush=False)["id"] for i in range(n)]
        got = receiver.wait_for(n, "/hook", timeout=120)
        time.sleep(1)  # a duplicate would arrive right behind: count after a pause
        got = receiver.received("/hook")
    finally:
        receiver.stop()
    ids = [r.json["event_id"] for r in got]
    assert sorted(ids) == sorted(sent), f"{len(ids)} deliveries for {len(sent)} events; missing {set(sent) - set(ids)}"
    return [r.json for r in got]


# ---- 1. the image ----------------------------------------------------------------------------------
def test_image_runs_the_worker_as_non_root_without_compilers(images: dict[str, str]) -> None:
    info = inspect(images["worker"])
    config = info["Config"]
    assert config["User"] == "10001"
    assert config["Entrypoint"] == ["perfex-webhooks"] and config["Cmd"] == ["worker", "--no-apply-topics"]
    hc = info["Healthcheck"]["Test"]  # podman: beside Config (docker format images only)
    assert hc[0] == "CMD" and "/health" in hc[-1]
    probe = "id -u; for c in gcc cc g++ make; do command -v $c; done; test -e /run/secrets/ca-bundle && echo secret-left; true"
    out = run("podman", "run", "--rm", "--entrypoint", "sh", images["worker"], "-c", probe).stdout.split()
    assert out == ["10001"], f"expected uid 10001 and no compiler or build secret, got {out}"
    size_mb = info["Size"] / 1e6
    (ROOT / "test-output").mkdir(exist_ok=True)
    (ROOT / "test-output" / "image-size.txt").write_text(f"{images['worker']} on {images['base']}: {size_mb:.0f} MB\n")
    assert size_mb < 400, f"the worker image is {size_mb:.0f} MB"


# ---- 2. the compose stack --------------------------------------------------------------------------
def test_compose_two_workers_deliver_every_event_and_prometheus_scrapes_both(stack: Stack) -> None:
    workers = [stack.container("worker", i) for i in (1, 2)]
    bases = [f"http://{address(w)}:{PORT}" for w in workers]
    for base in bases:
        eventually(answers(lambda base=base: ready(base)), 180, f"{base}/ready")
    # The image's HEALTHCHECK, run on demand (podman schedules it with systemd timers, which our
    # machines lack); one slow probe on a busy machine is not a failure (retries=3), so poll.
    for w in workers:
        eventually(lambda w=w: run("podman", "healthcheck", "run", w, check=False).returncode == 0, 60, f"{w} healthy")

    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": f"localhost:{stack.kafka_port}"})
    got = deliver_and_count(bases[0], stack.token, settings, EVENTS)
    assert len(got) == EVENTS

    prom = f"http://{address(stack.container('prometheus'))}:9090"

    def query(q: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=5)
        assert r.status_code == 200, r.text
        return list(r.json()["data"]["result"])

    worker_ips = sorted(address(w) for w in workers)
    # DNS service discovery of the compose service `worker`: one target per replica, both up.
    eventually(
        answers(lambda: sorted(s["metric"]["instance"].split(":")[0] for s in query('up{job="perfex-webhooks"} == 1')) == worker_ips),
        60,
        "Prometheus to scrape both workers",
    )
    # What the workers delivered, summed over both replicas by Prometheus.
    total = 'sum(webhooks_deliveries_total{outcome="success"})'
    eventually(answers(lambda: [float(s["value"][1]) for s in query(total)] == [float(EVENTS)]), 60, f"{total} == {EVENTS}")


# ---- 3. the Kubernetes manifests -------------------------------------------------------------------
def k8s_manifests(stack: Stack, prefix: str) -> tuple[str, dict[str, Any]]:
    """The ConfigMap, Deployment and Service of deploy/k8s as they are, with what an operator sets
    for this cluster: the image, Kafka (the compose stack's container), one replica (kube play runs
    one), private targets (the receiver is on the host); and the Secret with real tokens."""
    docs = []
    for name in ("configmap.yaml", "deployment.yaml", "service.yaml"):
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["image"] = WORKER_IMAGE
    deployment["spec"]["replicas"] = 1
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cm["data"].update(
        KAFKA_BOOTSTRAP_SERVERS="kafka:9092",
        WEBHOOKS_TOPIC_PREFIX=prefix,
        WEBHOOKS_ALLOW_PRIVATE_TARGETS="true",
        WEBHOOKS_REPLICATION_FACTOR="1",
    )
    # The Secret the Deployment reads, as kustomization.yaml's secretGenerator makes it from the
    # operator's secrets.env (kube play has no kustomize; the generated name's hash suffix aside).
    (secret_name,) = [r["secretRef"]["name"] for r in container["envFrom"] if "secretRef" in r]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["secretGenerator"] if g["name"] == secret_name]
    assert generator["envs"] == ["secrets.env"]
    tokens = {"WEBHOOKS_ADMIN_TOKEN": stack.token, "WEBHOOKS_METRICS_TOKEN": stack.metrics_token}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in tokens.items()},
    }
    return yaml.safe_dump_all(docs), secret


def test_kubernetes_manifests_run_under_kube_play(stack: Stack, tmp_path: Path) -> None:
    prefix = f"k{uuid.uuid4().hex[:6]}."
    network = f"{stack.project}_default"
    # The topics Job's command (podman has no Jobs), on a single broker.
    job = yaml.safe_load((DEPLOY / "k8s" / "topics-job.yaml").read_text())
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [("1" if prev == "--replication-factor" else a) for prev, a in zip(["", *args[:-1]], args, strict=True)]
    run(
        "podman", "run", "--rm", "--network", network, "-e", "KAFKA_BOOTSTRAP_SERVERS=kafka:9092",
        "-e", f"WEBHOOKS_TOPIC_PREFIX={prefix}", WORKER_IMAGE, *args, timeout=120,
    )  # fmt: skip
    manifests, secret = k8s_manifests(stack, prefix)
    manifest = tmp_path / "perfex-webhooks.yaml"
    manifest.write_text(manifests)
    # kube play (podman 4.3) resolves envFrom.secretRef to the podman secret of that name, which
    # holds the Secret's `data` as JSON.
    secret_file = tmp_path / "secret.json"
    secret_file.write_text(json.dumps(secret["data"]))
    secret_name = secret["metadata"]["name"]
    run("podman", "secret", "rm", secret_name, check=False)
    run("podman", "secret", "create", secret_name, secret_file)
    try:
        run("podman", "kube", "play", "--network", network, manifest, timeout=120)
        pods = json.loads(run("podman", "pod", "ps", "--format", "json", "--filter", "name=perfex-webhooks-worker").stdout)
        assert len(pods) == 1, pods
        (worker,) = [c["Names"] for c in pods[0]["Containers"] if c["Names"].endswith("-worker")]
        c = inspect(worker)
        assert c["Config"]["User"] == "10001" and c["HostConfig"]["ReadonlyRootfs"] is True
        env = dict(e.split("=", 1) for e in c["Config"]["Env"])
        assert env["WEBHOOKS_ADMIN_TOKEN"] == stack.token and env["WEBHOOKS_TOPIC_PREFIX"] == prefix
        base = f"http://{address(worker)}:{PORT}"
        eventually(answers(lambda: ready(base)), 180, f"the pod's readiness probe path {base}/ready")
        settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": f"localhost:{stack.kafka_port}", "WEBHOOKS_TOPIC_PREFIX": prefix})
        got = deliver_and_count(base, stack.token, settings, EVENTS)
        assert len(got) == EVENTS
    finally:
        run("podman", "kube", "down", manifest, check=False, timeout=120)
        run("podman", "secret", "rm", secret_name, check=False)


# ---- compose down ----------------------------------------------------------------------------------
def test_compose_down_removes_containers_volumes_and_network(stack: Stack) -> None:
    assert stack.leftovers(), "the stack should be up before `down`"
    stack.compose("down", "-v", "-t", "10", timeout=180)
    assert stack.leftovers() == []
