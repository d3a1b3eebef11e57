"""The container tests' images, built on a local Debian base: `python -m tests.containers.images`.

Registries of images cannot be reached on our machines, so every image is built here on a local
Debian base (scripts/base-image, debootstrap, cached per day): the worker image from
deploy/Dockerfile (BASE_IMAGE), and, for the compose stack only, Kafka 4.0.2 from the same Maven
jars as the test broker and Prometheus from Debian's package (tests/containers/compose.test.yml).
Cold, the builds take ~10 min on 2 cores; cached by podman's layers, seconds. `.ci/run` builds them
as an install step before the tests; tests/test_containers.py builds them too (cached: seconds), so
the container tests also run on their own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
HERE = ROOT / "tests" / "containers"
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", HERE / "compose.test.yml"]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WORKER_IMAGE = "localhost/perfex-webhooks:local"  # what compose's `perfex-webhooks:local` resolves to


def run(*cmd: str | Path, timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return res


def kafka_libs() -> Path:
    from devtools.local_broker import fetch_jars

    return fetch_jars()


def build(dockerfile: str, context: Path, tag: str, base: str, **args: str) -> None:
    """podman build with the Debian base; the host's CA bundle is a build secret (pip, behind a
    TLS-intercepting proxy), never a layer. --format docker keeps HEALTHCHECK (OCI has none)."""
    cmd: list[str | Path] = ["podman", "build", "--format", "docker", "-f", context / dockerfile, "-t", tag]
    for k, v in {"BASE_IMAGE": base, **args}.items():
        cmd += ["--build-arg", f"{k}={v}"]
    if CA_BUNDLE.exists():
        cmd += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
    run(*cmd, context, timeout=1200)


def compose_doc(path: Path) -> dict[str, Any]:
    # compose.test.yml uses the compose tags !reset/!override: read it without them.
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(path.read_text(), Loader=Loader)


def build_all() -> dict[str, str]:
    """Build (or find in podman's cache) the base, worker, Kafka and Prometheus images."""
    if shutil.which("podman") is None:
        raise RuntimeError("podman is missing: scripts/bootstrap installs it")
    base = run(ROOT / "scripts" / "base-image", timeout=900).stdout.strip().splitlines()[-1]
    services = compose_doc(COMPOSE_FILES[0])["services"]
    b = services["topics"]["build"]
    assert services["worker"]["image"] == services["topics"]["image"] == "perfex-webhooks:local"
    build(b["dockerfile"], (DEPLOY / b["context"]).resolve(), WORKER_IMAGE, base)
    test_services = compose_doc(COMPOSE_FILES[1])["services"]
    libs = kafka_libs().resolve().relative_to(ROOT)  # the context is the repository root
    for name, extra in (("kafka", {"KAFKA_LIBS": str(libs)}), ("prometheus", {})):
        svc = test_services[name]
        build(svc["build"]["dockerfile"], (DEPLOY / svc["build"]["context"]).resolve(), svc["image"], base, **extra)
    return {"base": base, "worker": WORKER_IMAGE}


if __name__ == "__main__":
    import time

    t0 = time.monotonic()
    built = build_all()
    print(f"container images ready in {time.monotonic() - t0:.0f} s: {', '.join(built.values())}")
