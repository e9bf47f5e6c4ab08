"""Static checks of deploy/: hadolint, yamllint, Kubernetes schemas, promtool, nginx -t, and the
properties the issue asks of each file."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from sglang_testing import ROOT

DEPLOY = ROOT / "deploy"
VENV = ROOT / ".venv" / "bin"


def run(*cmd):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


class Loader(yaml.SafeLoader):
    """Compose's !reset / !override tags, read as plain values."""


Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_object(node) if not isinstance(node, yaml.MappingNode) else loader.construct_mapping(node))
Loader.add_constructor("!reset", lambda loader, node: None)


def load(path):
    return yaml.load(Path(path).read_text(), Loader=Loader)


def test_hadolint():
    run(VENV / "hadolint", "--config", DEPLOY / ".hadolint.yaml", DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu",
        DEPLOY / "Dockerfile.cpu-prebuilt")


def test_dockerfiles_have_what_operations_need():
    for name in ["Dockerfile", "Dockerfile.cpu"]:
        text = (DEPLOY / name).read_text()
        assert "USER 1000:1000" in text, name
        assert "EXPOSE 30000" in text, name
        assert 'HEALTHCHECK' in text and '"sglang-server", "probe"' in text, name
        assert "SGLANG_MODEL_PATH" in text, name
        assert text.count("FROM ") >= 2, f"{name} is multi-stage"
    # the image built from host artefacts (tests/deploy/test_container.py builds and runs it)
    # runs the same way as the multi-stage CPU image's final stage
    prebuilt = (DEPLOY / "Dockerfile.cpu-prebuilt").read_text()
    final_cpu_stage = (DEPLOY / "Dockerfile.cpu").read_text().split("FROM debian:bookworm-slim", 1)[1]
    for line in final_cpu_stage.splitlines():
        if line.startswith(("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "ENV", "    SGLANG_", "    && ")):
            assert line in prebuilt, f"Dockerfile.cpu-prebuilt lacks {line!r}"
    assert "--features sglang/cuda" in (DEPLOY / "Dockerfile").read_text()
    assert "nvidia/cuda" in (DEPLOY / "Dockerfile").read_text()


def test_yamllint():
    run(VENV / "yamllint", "-c", DEPLOY / ".yamllint", DEPLOY)


def test_kubernetes_manifests_validate():
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted((DEPLOY / "k8s" / "tensor-parallel").glob("*.yaml"))
    core = [m for m in manifests if m.name != "servicemonitor.yaml"]
    out = run(VENV / "kubernetes-validate", "--strict", *core)
    assert "WARN" not in out and "ERROR" not in out, out
    assert "sglang-tp-worker" in out and "sglang-tp-head" in out
    # ServiceMonitor is a CRD: checked against the vendored subset of its schema
    import jsonschema
    schema = json.loads((DEPLOY / "k8s" / "schemas" / "servicemonitor.schema.json").read_text())
    jsonschema.validate(load(DEPLOY / "k8s" / "servicemonitor.yaml"), schema)


def test_kubernetes_deployment_properties():
    d = load(DEPLOY / "k8s" / "deployment.yaml")
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        assert c[probe]["timeoutSeconds"] >= 5, probe
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in vols["tmp"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/models"} <= mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    drain = float(env["SGLANG_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert "requests" in c["resources"] and "limits" in c["resources"]
    ns = load(DEPLOY / "k8s" / "namespace.yaml")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    hpa = load(DEPLOY / "k8s" / "hpa.yaml")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "sglang_request_queue_length"
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"} == {"cpu", "memory"}
    ing = load(DEPLOY / "k8s" / "ingress.yaml")
    assert ing["spec"]["tls"][0]["secretName"]


def test_promtool():
    run("promtool", "check", "config", DEPLOY / "monitoring" / "prometheus.yml")
    run("promtool", "check", "config", DEPLOY / "monitoring" / "prometheus.compose.yml")
    out = run("promtool", "check", "rules", DEPLOY / "monitoring" / "alerts.yml")
    assert "8 rules found" in out


def test_alerts_cover_the_issue():
    names = {r["alert"] for g in load(DEPLOY / "monitoring" / "alerts.yml")["groups"] for r in g["rules"]}
    assert names == {"SGLangInstanceDown", "SGLangQueueGrowing", "SGLangHighP95Latency", "SGLangHighTTFT",
                     "SGLangKVCacheNearlyFull", "SGLangLowCacheHitRate", "SGLangGPUMemoryHigh",
                     "SGLangTensorParallelRankDown"}


def test_compose_files():
    c = load(DEPLOY / "docker-compose.yml")
    s = c["services"]["sglang"]
    assert s["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models:ro") for v in s["volumes"])
    assert any("/var/log/sglang" in v for v in s["volumes"])
    assert s["healthcheck"]["test"] == ["CMD", "sglang-server", "probe"]
    assert s["restart"] == "unless-stopped" and s["read_only"] is True
    assert all(k.startswith("SGLANG_") for k in s["environment"])
    g = c["services"]["grafana"]["environment"]
    assert g["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default password"
    assert "redis" not in c["services"]
    stack = load(DEPLOY / "docker-stack.yml")
    assert stack["networks"]["sglang-net"]["driver"] == "overlay"
    services = stack["services"]
    assert {"sglang-head", "sglang-worker", "router"} <= set(services)
    router = services["router"]
    assert router["entrypoint"] == ["sglang-router"]
    assert router["environment"]["SGLANG_ROUTER_WORKER_DNS"] == "tasks.sglang-head:30000"
    head, worker = services["sglang-head"]["environment"], services["sglang-worker"]["environment"]
    for env in (head, worker):
        assert {"SGLANG_TP_SIZE", "SGLANG_WORLD_SIZE", "SGLANG_RANK", "SGLANG_MASTER_ADDR",
                "SGLANG_MASTER_PORT"} <= set(env)
        assert all(k.startswith("SGLANG_") for k in env)
    # the world is the head plus one rank per worker replica
    assert int(head["SGLANG_WORLD_SIZE"]) == 1 + services["sglang-worker"]["deploy"]["replicas"]
    assert head["SGLANG_RANK"] == "0" and worker["SGLANG_RANK"] == "{{.Task.Slot}}"
    assert worker["SGLANG_MASTER_ADDR"] == "sglang-head"
    assert "sglang-head:30000" in (DEPLOY / "nginx" / "upstream.swarm.conf").read_text()


def test_router_deployments():
    """Compose, swarm and Kubernetes put sglang-router in front of the replicas, finding them
    by DNS; Kubernetes through a headless Service, reached by the ingress, allowed by policy."""
    c = load(DEPLOY / "docker-compose.router.yml")["services"]
    assert c["router"]["entrypoint"] == ["sglang-router"]
    assert c["router"]["environment"]["SGLANG_ROUTER_WORKER_DNS"] == "sglang:30000"
    assert c["sglang"]["ports"] is None and "replicas" in c["sglang"]["deploy"]
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((DEPLOY / "k8s" / "router.yaml").read_text())}
    workers = docs[("Service", "sglang-workers")]["spec"]
    assert workers["clusterIP"] == "None" and workers["selector"] == {"app.kubernetes.io/name": "sglang"}
    pod = docs[("Deployment", "sglang-router")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SGLANG_ROUTER_WORKER_DNS"].startswith("sglang-workers.sglang.svc")
    assert pod["containers"][0]["command"] == ["sglang-router"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    ing = load(DEPLOY / "k8s" / "ingress.yaml")
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "sglang-router"
    allowed = load(DEPLOY / "k8s" / "networkpolicy.yaml")["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sglang-router"}}} in allowed
    for name in ("sglang-server", "sglang-router"):
        for f in ("Dockerfile", "Dockerfile.cpu", "Dockerfile.cpu-prebuilt"):
            assert name in (DEPLOY / f).read_text(), (name, f)


def test_grafana_provisioning():
    dash = json.loads((DEPLOY / "monitoring" / "grafana" / "dashboards" / "sglang.json").read_text())
    ds = load(DEPLOY / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uid = ds["datasources"][0]["uid"]
    titles = [p["title"] for p in dash["panels"]]
    for want in ["Request rate", "Request latency", "Time to first token", "Inter-token latency", "Running and queued",
                 "KV cache usage", "Prefix cache hit rate", "GPU utilisation", "Memory"]:
        assert any(t.startswith(want) for t in titles), want
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"]


def test_nginx_config():
    d = Path(tempfile.mkdtemp())
    shutil.copy(DEPLOY / "nginx" / "nginx.conf", d / "nginx.conf")
    (d / "upstream.conf").write_text("server 127.0.0.1:1;\n")
    run("nginx", "-t", "-c", d / "nginx.conf")


def test_kubernetes_tensor_parallel_properties():
    tp = DEPLOY / "k8s" / "tensor-parallel"
    svcs = {d["metadata"]["name"]: d for d in yaml.load_all((tp / "services.yaml").read_text(), Loader=Loader)}
    # the head is only ready once every rank joined it: its DNS name must exist before that
    assert svcs["sglang-tp"]["spec"]["clusterIP"] == "None"
    assert svcs["sglang-tp"]["spec"]["publishNotReadyAddresses"] is True
    assert svcs["sglang-tp-http"]["spec"]["selector"]["app.kubernetes.io/component"] == "head"
    head, worker = load(tp / "head.yaml"), load(tp / "worker.yaml")
    for s in (head, worker):
        assert s["kind"] == "StatefulSet" and s["spec"]["serviceName"] == "sglang-tp"
        pod = s["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["command"][:2] == ["/bin/sh", "/etc/sglang/launch.sh"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsUser"] == 1000
        assert {"name": "launch", "configMap": {"name": "sglang-tp-launch", "defaultMode": 0o555}} in pod["volumes"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["SGLANG_MASTER_ADDR"] == "sglang-tp-head-0.sglang-tp"
        assert "SGLANG_RANK" not in env, "the launch script sets the rank"
    world = int({e["name"]: e.get("value") for e in head["spec"]["template"]["spec"]["containers"][0]["env"]}
                ["SGLANG_WORLD_SIZE"])
    assert world == 1 + worker["spec"]["replicas"]
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
