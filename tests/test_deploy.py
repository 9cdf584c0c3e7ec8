"""docker-compose.yml and deploy/ checked without Docker or a cluster.

* The compose file against the Compose Specification's JSON Schema (vendored in
  tests/schemas/, see its README), the Kubernetes manifests against the Kubernetes
  1.30 schemas bundled with ``kubernetes-validate`` (strict: unknown fields are
  errors), and the KEDA ScaledObjects against tests/schemas/keda-scaledobject.schema.json.
* Consistency: every pool of workers/pools.yaml has a compose service, a Deployment, a
  PodDisruptionBudget and a ScaledObject on its queues, and nothing names a pool that
  does not exist.
* Every command in them parses with the real CLI (and Celery's worker options with
  Celery's own parser), and ``orchestrator <command> --help`` exits 0 for each.

Running those commands as processes is tests/integration/test_compose_commands.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DEPLOY = REPO_ROOT / "deploy"
POOLS = REPO_ROOT / "workers" / "pools.yaml"
SCHEMAS = REPO_ROOT / "tests" / "schemas"
K8S_VERSION = "1.30.0"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == kind}


def _pools() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(POOLS.read_text())["pools"]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


# -- schemas ------------------------------------------------------------------------------


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert _compose_errors(_compose()) == []
    # The schema is strict enough to catch a misspelt field.
    broken = _compose()
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert any("helthcheck" in e for e in _compose_errors(broken))


def test_manifests_follow_the_kubernetes_schemas() -> None:
    kinds = set()
    for name, doc in _manifests():
        if doc["kind"] in ("Kustomization", "ScaledObject"):
            continue
        kinds.add(doc["kind"])
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} <= kinds
    broken = copy.deepcopy(_of_kind("Deployment")["beat"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["cmd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _scaled_object_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "keda-scaledobject.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_scaled_objects_follow_the_keda_schema() -> None:
    scaled = _of_kind("ScaledObject")
    assert scaled
    for name, doc in scaled.items():
        assert _scaled_object_errors(doc) == [], name
    doc = copy.deepcopy(next(iter(scaled.values())))
    doc["spec"]["triggers"][0]["metadata"]["listLength"] = 20  # KEDA wants strings
    doc["spec"]["minReplicas"] = 1
    errors = " ".join(_scaled_object_errors(doc))
    assert "listLength" in errors and "minReplicas" in errors


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["kind"] == "Kustomization"


# -- consistency --------------------------------------------------------------------------


def test_every_pool_has_a_compose_service_a_deployment_and_a_scaled_object() -> None:
    pools = _pools()
    services = _compose()["services"]
    deployments = _of_kind("Deployment")
    budgets = _of_kind("PodDisruptionBudget")
    scaled = _of_kind("ScaledObject")
    worker_services = {
        n for n, s in services.items() if s["command"][:2] == ["orchestrator", "worker"]
    }
    assert worker_services == {f"worker-{p}" for p in pools}
    for pool, spec in pools.items():
        name = f"worker-{pool}"
        assert services[name]["command"][:4] == ["orchestrator", "worker", "--pool", pool]
        assert services[name]["deploy"]["replicas"] >= 1
        (container,) = _containers(deployments[name])
        assert container["command"][:4] == ["orchestrator", "worker", "--pool", pool]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        target = scaled[name]["spec"]
        assert target["scaleTargetRef"]["name"] == name
        assert {t["metadata"]["listName"] for t in target["triggers"]} == set(spec["queues"])
        assert all(t["type"] == "redis" for t in target["triggers"])
    assert set(scaled) == {f"worker-{p}" for p in pools}


def test_the_default_queue_never_scales_to_zero() -> None:
    # beat's tick (timers, schedules) goes to the default queue: someone must consume it.
    for doc in _of_kind("ScaledObject").values():
        queues = {t["metadata"]["listName"] for t in doc["spec"]["triggers"]}
        if "default" in queues:
            assert doc["spec"].get("minReplicaCount", 0) >= 1


def test_keda_reads_the_redis_the_workers_use() -> None:
    config = _of_kind("ConfigMap")["orchestrator-config"]["data"]
    namespace = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["namespace"]
    assert config["ORCHESTRATOR_REDIS_URL"] == "redis://redis:6379/0"
    assert "redis" in _of_kind("Service")
    for doc in _of_kind("ScaledObject").values():
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert meta["address"] == f"redis.{namespace}.svc.cluster.local:6379"
            assert meta["databaseIndex"] == "0"


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis_service = _compose()["services"]["redis"]
    assert "--appendonly" in redis_service["command"]
    assert redis_service["command"][redis_service["command"].index("--appendonly") + 1] == "yes"
    assert redis_service["volumes"] == ["redis-data:/data"]
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    statefulset = _of_kind("StatefulSet")["redis"]
    (container,) = _containers(statefulset)
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_probes_grace_periods_and_secrets() -> None:
    for name, doc in {**_of_kind("Deployment"), **_of_kind("StatefulSet")}.items():
        for container in _containers(doc):
            assert "livenessProbe" in container and "readinessProbe" in container, name
    for name, doc in _of_kind("Deployment").items():
        if name.startswith("worker-"):
            assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    api = _containers(_of_kind("Deployment")["api"])[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    secret_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for d in _of_kind("Deployment").values()
        for c in _containers(d)
        for e in c.get("env", [])
        if "valueFrom" in e
    }
    assert secret_refs == {
        "ORCHESTRATOR_API_TOKENS": "orchestrator-secrets",
        "ORCHESTRATOR_FLOWER_BASIC_AUTH": "orchestrator-secrets",
    }
    secret = _of_kind("Secret")["orchestrator-secrets"]["stringData"]
    assert set(secret) == set(secret_refs)
    assert all("REPLACE-ME" in v for v in secret.values())  # placeholders only
    services = _compose()["services"]
    assert all("healthcheck" in s for s in services.values())
    assert services["api"]["environment"]["ORCHESTRATOR_API_TOKENS"].startswith(
        "${ORCHESTRATOR_API_TOKENS:?"
    )
    assert services["flower"]["environment"]["ORCHESTRATOR_FLOWER_BASIC_AUTH"].startswith(
        "${ORCHESTRATOR_FLOWER_BASIC_AUTH:?"
    )


def test_one_image_built_from_the_dockerfile() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert [line for line in dockerfile.splitlines() if line.startswith("FROM")] == [
        "FROM python:3.11-slim"
    ]
    assert "pip install ." in dockerfile and "COPY workers ./workers" in dockerfile
    images = {
        s["image"] for s in _compose()["services"].values() if s["image"].startswith("celery-")
    }
    assert images == {"celery-orchestrator:latest"}
    built = [s for s in _compose()["services"].values() if "build" in s]
    assert built and all(s["build"] == "." for s in built)
    for doc in _of_kind("Deployment").values():
        assert _containers(doc)[0]["image"] == "celery-orchestrator:latest"


# -- commands -----------------------------------------------------------------------------


def _commands() -> Iterator[tuple[str, list[str]]]:
    """Every ``orchestrator ...`` command line in the compose file and the manifests."""
    for name, service in _compose()["services"].items():
        yield f"compose {name}", service["command"]
        test = service.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            yield f"compose {name} healthcheck", test[1:]
    for file, doc in _manifests():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in _containers(doc):
            where = f"{file} {doc['metadata']['name']}"
            yield where, container.get("command") or container.get("args", [])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    yield f"{where} {probe}", command


def _parse(argv: list[str]) -> tuple[str, click.Context]:
    """Parse an ``orchestrator`` command line with the real CLI, as the shell would run it."""
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker as celery_worker

    from orchestrator.app import create_app
    from orchestrator.cli import cli, pool_args

    root = click.Context(cli, info_name="orchestrator")
    name = argv[1]
    command = cli.get_command(root, name)
    assert command is not None, f"no command {name!r}"
    ctx = command.make_context(name, list(argv[2:]), parent=root)
    if name == "worker":
        pool = ctx.params["pool_name"]
        passed = [*(pool_args(POOLS, pool) if pool else []), *ctx.args]
        obj = CLIContext(app=create_app(), no_color=True, workdir=None, quiet=True)
        celery_worker.make_context("worker", passed, obj=obj)  # Celery's own option parser
    else:
        assert ctx.args == [], f"{argv}: unexpected arguments {ctx.args}"
    return name, ctx


def test_every_command_parses_with_the_real_cli() -> None:
    used: set[str] = set()
    for where, argv in _commands():
        if argv[:1] != ["orchestrator"]:
            continue
        try:
            name, _ = _parse(argv)
        except click.ClickException as exc:
            pytest.fail(f"{where}: {argv}: {exc.format_message()}")
        used.add(name)
    assert used == {"worker", "beat", "api", "flower", "health"}
    # Each subcommand also answers --help (running them is test_compose_commands.py).
    from click.testing import CliRunner

    from orchestrator.cli import cli

    for name in sorted(used):
        result = CliRunner().invoke(cli, [name, "--help"], prog_name="orchestrator")
        assert result.exit_code == 0, f"orchestrator {name} --help: {result.output}"
        assert f"Usage: orchestrator {name}" in result.output


def test_a_wrong_command_would_be_caught() -> None:
    with pytest.raises(click.ClickException):
        _parse(["orchestrator", "worker", "--pool", "io", "--concurrency", "many"])
    with pytest.raises(click.ClickException):
        _parse(["orchestrator", "worker", "--pool", "nope"])
    with pytest.raises(click.ClickException):
        _parse(["orchestrator", "api", "--prot", "8000"])
