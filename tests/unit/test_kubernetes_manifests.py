"""The Kubernetes manifests (deploy/kubernetes), offline: every object the base and the sysbox
overlay render to is valid against the Kubernetes JSON schemas bundled by ``kubernetes-validate``
(strict: unknown fields are refused), and they hold what the system relies on: a sandbox's id
is its pod name, its dockerd sits on a volume of its own, the images are ours, no host socket.

No kustomize binary here: ``render`` does what ``kubectl apply -k`` does for the features the
kustomizations use (resources, namespace, labels, images, strategic-merge patches) and refuses
any other, so a kustomization growing beyond it fails here instead of going unchecked.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from orchestrator.config import WorkerSettings
from workers.firewall import PRIVATE
from workers.privilege import SECCOMP_PROFILE, USERNS_CAPS

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "deploy" / "kubernetes"
SYSBOX = ROOT / "overlays" / "sysbox"
# Files that are not applied: shown for users to copy (the tokens Secret holds real hashes).
EXAMPLES = {ROOT / "secret-tokens.example.yaml"}
# The oldest Kubernetes the manifests target, and the newest the installed package knows.
KUBERNETES_VERSIONS = sorted({"1.30", kubernetes_validate.latest_version()})
# The only images pods run; the desktop image is pulled by the sandboxes' own dockerd.
OUR_IMAGES = {"orchestrator/sandbox"}
RENDERED_FEATURES = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
# Strategic merge keys for the lists a patch may touch (by the list's field name).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(directory: Path) -> Doc:
    (k,) = load(directory / "kustomization.yaml")
    assert isinstance(k, dict)
    return k


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        merge_key = MERGE_KEYS[field]
        merged = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = strategic_merge(merged[at], item)
        return merged
    return copy.deepcopy(patch)


def identity(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def render(directory: Path, k: Doc | None = None) -> list[Doc]:
    """The objects ``kubectl apply -k directory`` applies (``k``: the kustomization, if not the file's)."""
    k = kustomization(directory) if k is None else k
    unknown = set(k) - RENDERED_FEATURES
    assert not unknown, f"{directory}: the test does not render kustomize's {sorted(unknown)}; extend render()"
    docs: list[Doc] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        docs += render(path) if path.is_dir() else load(path)
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"only strategic-merge patches from files are rendered, got {patch}"
        (change,) = load(directory / patch["path"])
        targets = [i for i, d in enumerate(docs) if identity(d) == identity(change)]
        assert len(targets) == 1, f"{patch['path']} must patch exactly one object, matches {len(targets)}"
        docs[targets[0]] = strategic_merge(docs[targets[0]], change)
    for doc in docs:
        meta = doc["metadata"]
        if "namespace" in k and doc["kind"] != "Namespace":
            meta["namespace"] = k["namespace"]
        for entry in k.get("labels", []):
            assert set(entry) == {"pairs"}, f"labels with {sorted(set(entry) - {'pairs'})} are not rendered"
            meta.setdefault("labels", {}).update(entry["pairs"])
        if doc["kind"] in WORKLOADS:
            for container in containers(doc):
                for image in k.get("images", []):
                    name, _, tag = container["image"].partition(":")
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


BASE = render(ROOT)
OVERLAY = render(SYSBOX)
VARIANTS = {"base": BASE, "sysbox": OVERLAY}


def the(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if identity(d) == (kind, name)]
    return doc


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def validate(doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def all_yaml_files() -> Iterator[Path]:
    yield from sorted(p for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_is_rendered_or_an_example() -> None:
    used: set[Path] = set(EXAMPLES)
    for k_file in ROOT.rglob("kustomization.yaml"):
        used.add(k_file)
        k = kustomization(k_file.parent)
        used.update((k_file.parent / r).resolve() for r in k.get("resources", []))
        used.update((k_file.parent / p["path"]).resolve() for p in k.get("patches", []))
    assert set(all_yaml_files()) - used == set(), "YAML under deploy/kubernetes that nothing applies or checks"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_valid(variant: str, version: str) -> None:
    problems = []
    for doc in VARIANTS[variant]:
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} at {where or '.'}: {e.message}")
    assert not problems, f"{variant} against Kubernetes {version}:\n" + "\n".join(problems)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_examples_are_valid(version: str) -> None:
    for path in EXAMPLES:
        for doc in load(path):
            validate(doc, version)


def test_validation_refuses_unknown_fields_and_bad_values() -> None:
    """The check above is worth something: strict mode is on and reaches into pod templates."""
    broken = copy.deepcopy(the(BASE, "StatefulSet", "sandbox"))
    pod_spec(broken)["containers"][0]["volumeMount"] = []  # a typo for volumeMounts
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        validate(broken, KUBERNETES_VERSIONS[0])
    broken = copy.deepcopy(the(BASE, "Deployment", "api"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, KUBERNETES_VERSIONS[0])


def test_everything_is_in_the_namespace() -> None:
    for variant, docs in VARIANTS.items():
        assert the(docs, "Namespace", "orchestrator")
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "orchestrator", (variant, identity(doc))
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "orchestrator", (variant, identity(doc))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_run_only_our_images(variant: str) -> None:
    for doc in VARIANTS[variant]:
        if doc["kind"] in WORKLOADS:
            for container in containers(doc):
                name, _, tag = container["image"].partition(":")
                assert name in OUR_IMAGES and tag, (identity(doc), container["image"])
    desktop = env_of(the(VARIANTS[variant], "StatefulSet", "sandbox")["spec"]["template"]["spec"]["containers"][0])
    assert desktop["ORCH_DESKTOP_IMAGE"]["value"].startswith("orchestrator/desktop:")


def test_the_images_entry_renames_every_pod_image() -> None:
    k = kustomization(ROOT)
    (entry,) = k["images"]
    entry.update(newName="registry.example.com/team/sandbox", newTag="v7")
    images = {c["image"] for d in render(ROOT, k) if d["kind"] in WORKLOADS for c in containers(d)}
    assert images == {"registry.example.com/team/sandbox:v7"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_host_docker_socket(variant: str) -> None:
    """Sandboxes run their own dockerd: a node's socket (or its directory) would hand them the node."""
    forbidden_dirs = {"/run", "/var/run", "/run/docker", "/var/run/docker", "/var/lib/docker", "/run/containerd"}
    for doc in VARIANTS[variant]:
        if doc["kind"] in WORKLOADS:
            for volume in pod_spec(doc).get("volumes", []):
                path = volume.get("hostPath", {}).get("path")
                if path is not None:
                    path = path.rstrip("/") or "/"
                    assert not path.endswith(".sock") and path not in forbidden_dirs, (identity(doc), path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sandbox_identity_storage_and_metrics(variant: str) -> None:
    sandbox = the(VARIANTS[variant], "StatefulSet", "sandbox")
    spec = pod_spec(sandbox)
    (container,) = spec["containers"]
    env = env_of(container)

    # The id names the sandbox's queue: the StatefulSet pod name, stable across restarts.
    assert env["ORCH_SANDBOX_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Its dockerd on a volume claim of its own (a real filesystem, kept across restarts).
    claims = {c["metadata"]["name"]: c for c in sandbox["spec"]["volumeClaimTemplates"]}
    assert "docker-data" in claims
    assert "docker-data" not in {v["name"] for v in spec.get("volumes", [])}, "a pod volume would shadow the claim"
    assert {"name": "docker-data", "mountPath": "/var/lib/docker"} in container["volumeMounts"]
    # Metrics: the worker's port, exposed under that name, and announced to Prometheus.
    (metrics,) = [p for p in container["ports"] if p.get("name") == "metrics"]
    assert str(metrics["containerPort"]) == env["ORCH_WORKER_METRICS_PORT"]["value"]
    annotations = sandbox["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM drains the sandbox: give jobs in flight time to finish.
    assert spec["terminationGracePeriodSeconds"] >= 120
    assert container["args"] == ["sandbox-init"] and "command" not in container, "keep tini, the entrypoint"

    expected = {
        "REDIS_URL": "redis://orchestrator-worker:$(REDIS_PASSWORD)@redis:6379/0",
        "ORCH_DEPTH": "1",
        "ORCH_PRIVILEGE": "auto",
        "ORCH_POOL_SIZE": "0",
        "ORCH_MAX_SESSIONS": "20",
        "ORCH_HEARTBEAT_INTERVAL": "5",
        "ORCH_REGISTRY": "registry:5000",
    }
    assert {name: env[name].get("value") for name in expected} == expected


def test_sandbox_privilege_per_variant() -> None:
    base, sysbox = (the(docs, "StatefulSet", "sandbox") for docs in (BASE, OVERLAY))
    assert "runtimeClassName" not in pod_spec(base)
    assert pod_spec(sysbox)["runtimeClassName"] == "sysbox-runc"
    # The overlay changes the runtime and nothing else of the sandboxes.
    undo = copy.deepcopy(sysbox)
    del pod_spec(undo)["runtimeClassName"]
    del undo["spec"]["template"]["metadata"]["annotations"]["io.kubernetes.cri-o.userns-mode"]
    assert undo == base
    assert [d for d in OVERLAY if identity(d) != ("StatefulSet", "sandbox")] == [
        d for d in BASE if identity(d) != ("StatefulSet", "sandbox")
    ]


@pytest.mark.parametrize("variant", ["base", "sysbox"])
def test_sandboxes_run_with_the_least_privilege_of_compose(variant: str) -> None:
    """Never privileged: the capabilities, seccomp deny-list and sysctls of docker-compose.yml's
    sandbox (measured there, docs/threat-model.md), and the seccomp file is the project's."""
    spec = pod_spec(the(BASE if variant == "base" else OVERLAY, "StatefulSet", "sandbox"))
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context.get("privileged") is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == sorted(USERNS_CAPS)
    assert context["seccompProfile"] == {"type": "Localhost", "localhostProfile": "orchestrator/sandbox.json"}
    assert "procMount" not in context  # Docker's masked and read-only paths
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["sandbox"]
    assert sorted(compose["cap_add"]) == sorted(context["capabilities"]["add"])
    assert {s["name"]: s["value"] for s in spec["securityContext"]["sysctls"]} == compose["sysctls"]
    assert "seccomp=deploy/seccomp/sandbox.json" in compose["security_opt"] and "privileged" not in compose
    # The profile on disk is the desktops' deny-list, which sandbox and desktops share.
    assert json.loads((REPO / "deploy" / "seccomp" / "sandbox.json").read_text()) == json.loads(SECCOMP_PROFILE)
    # No other container of any pod is privileged either.
    for doc in BASE if variant == "base" else OVERLAY:
        if doc["kind"] in WORKLOADS:
            for c in pod_spec(doc).get("containers", []) + pod_spec(doc).get("initContainers", []):
                assert not c.get("securityContext", {}).get("privileged"), (identity(doc), c["name"])


def test_api() -> None:
    api = the(BASE, "Deployment", "api")
    (container,) = pod_spec(api)["containers"]
    assert api["spec"]["replicas"] >= 2
    assert container["args"] == ["orchestrator", "api", "--host", "0.0.0.0", "--port", "8080"]
    env = env_of(container)
    assert env["REDIS_URL"]["value"] == "redis://orchestrator-api:$(REDIS_PASSWORD)@redis:6379/0"
    # Tokens from the Secret the example shows, which kustomize does not apply.
    ref = env["ORCH_TOKENS"]["valueFrom"]["secretKeyRef"]
    (secret,) = [d for path in EXAMPLES for d in load(path) if d["kind"] == "Secret"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert not any(d["kind"] == "Secret" for d in BASE), "real secrets are not the kustomization's to overwrite"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_redis_and_registry_persist() -> None:
    redis = the(BASE, "StatefulSet", "redis")
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert args[0] == "redis-server" and args[args.index("--appendonly") + 1] == "yes"
    # Every write fsynced before its reply: an acknowledged create survives a crash (docs/redis.md).
    assert args[args.index("--appendfsync") + 1] == "always"
    data = args[args.index("--dir") + 1]
    claim_names = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert any(m["mountPath"] == data and m["name"] in claim_names for m in container["volumeMounts"])

    registry = the(BASE, "Deployment", "registry")
    (container,) = pod_spec(registry)["containers"]
    assert container["args"] == ["docker-registry", "serve", "/etc/orchestrator/registry.yml"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/registry"]
    (volume,) = [v for v in pod_spec(registry)["volumes"] if v["name"] == mount["name"]]
    the(BASE, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_services_reach_their_pods(variant: str) -> None:
    """Every Service selects one workload's pods and targets ports they have, and the addresses
    the pods are given (REDIS_URL, ORCH_REGISTRY) are Services' ports."""
    docs = VARIANTS[variant]
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    ports: dict[str, set[int]] = {}
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        (workload,) = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selector <= workload["spec"]["selector"]["matchLabels"].items()
        pod_ports = [p for c in containers(workload) for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in pod_ports), (identity(service), target)
        ports[service["metadata"]["name"]] = {p["port"] for p in service["spec"]["ports"]}
    for workload in workloads:
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in ports, identity(workload)
        for container in containers(workload):
            env = env_of(container)
            addresses = []
            if "REDIS_URL" in env:
                url = urlsplit(env["REDIS_URL"]["value"])
                addresses.append((url.hostname, url.port))
            if "ORCH_REGISTRY" in env:
                host, _, port = env["ORCH_REGISTRY"]["value"].partition(":")
                addresses.append((host, int(port)))
            for host, port in addresses:
                assert host in ports and port in ports[host], (identity(workload), host, port)


# --- failing closed (security review H2) ------------------------------------------------------

MAKE_SECRETS = ROOT / "make-secrets.py"
REDIS_DOC = ROOT.parents[1] / "docs" / "redis.md"
# Where a cluster keeps what desktops must not reach: Services (10.96.0.1: the API server), pods
# on other nodes, a VPC, a LAN, CGNAT, cloud metadata.
CLUSTER_ADDRESSES = ["10.96.0.1", "10.244.2.7", "172.20.0.5", "192.168.1.10", "100.64.0.10", "169.254.169.254"]
SANDBOX_LABELS = {"app.kubernetes.io/name": "orchestrator", "app.kubernetes.io/component": "sandbox"}


def component(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "orchestrator", "app.kubernetes.io/component": name}


def secret_refs(docs: list[Doc]) -> list[tuple[str, str, str]]:
    """(workload, secret, key) of every env secretKeyRef and secret volume item."""
    refs = []
    for doc in (d for d in docs if d["kind"] in WORKLOADS):
        for container in containers(doc):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((doc["metadata"]["name"], ref["name"], ref["key"]))
        for volume in pod_spec(doc).get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    refs.append((doc["metadata"]["name"], volume["secret"]["secretName"], item["key"]))
    return refs


def mounted_secret_file(doc: Doc, secret: str, key: str) -> str:
    """The path where ``doc``'s (only) container sees ``key`` of ``secret``."""
    (container,) = pod_spec(doc)["containers"]
    for volume in pod_spec(doc)["volumes"]:
        if volume.get("secret", {}).get("secretName") == secret:
            (item,) = [i for i in volume["secret"]["items"] if i["key"] == key]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert mount.get("readOnly") is True
            return f"{mount['mountPath']}/{item['path']}"
    raise AssertionError(f"{identity(doc)} mounts no {secret}/{key}")


@cache
def generated_secrets() -> dict[str, dict[str, str]]:
    """What ``make-secrets.py`` prints, by Secret name (its stringData)."""
    out = subprocess.run([sys.executable, str(MAKE_SECRETS)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            validate(doc, version)
    return {d["metadata"]["name"]: d["stringData"] for d in docs}


def documented_acl() -> list[str]:
    (block,) = re.findall(r"^```acl\n(.*?)^```", REDIS_DOC.read_text(), re.S | re.M)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_desktops_are_denied_the_cluster_by_default(variant: str) -> None:
    """The firewall is on and the deny list, as the worker parses it, covers every private range."""
    (container,) = pod_spec(the(VARIANTS[variant], "StatefulSet", "sandbox"))["containers"]
    env = {name: e["value"] for name, e in env_of(container).items() if "value" in e}
    settings = WorkerSettings.from_env(env)
    assert settings.firewall is True
    assert not settings.desktop_allow, "no hole by default"
    denied = [ipaddress.ip_network(n) for n in settings.desktop_deny]
    for address in CLUSTER_ADDRESSES:
        assert any(ipaddress.ip_address(address) in n for n in denied), address
    # The same ranges the image denies on its own (workers/firewall.py), so neither relies on the other.
    rfc1918 = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"}
    assert rfc1918 <= set(PRIVATE) and rfc1918 <= set(settings.desktop_deny)


def policies_for(docs: list[Doc], labels: dict[str, str]) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]


def admits(peers: list[Doc], labels: dict[str, str]) -> bool:
    """Whether a pod of this namespace with ``labels`` is among ``peers`` (podSelectors only)."""
    return any(
        "namespaceSelector" not in peer and peer.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
        for peer in peers
        if "podSelector" in peer
    )


def test_network_policies_fence_the_sandboxes_redis_and_the_registry() -> None:
    (sandbox,) = policies_for(BASE, SANDBOX_LABELS)
    spec = sandbox["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    # In: the API's pods, on the metrics port, and no one else.
    (ingress,) = spec["ingress"]
    assert admits(ingress["from"], component("api")) and not admits(ingress["from"], component("sandbox"))
    assert ingress["ports"] == [{"protocol": "TCP", "port": 9100}, {"protocol": "TCP", "port": 9200}]  # metrics, access
    # Out: Redis, the registry, DNS, and an ipBlock for the internet that leaves out every private range.
    by_target: dict[str, Doc] = {}
    for rule in spec["egress"]:
        (peer,) = rule["to"]
        if "ipBlock" in peer:
            by_target["internet"] = rule
        elif "namespaceSelector" in peer:
            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
            by_target["dns"] = rule
        else:
            by_target[peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]] = rule
    assert sorted(by_target) == ["dns", "internet", "redis", "registry"]
    assert by_target["redis"]["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert by_target["registry"]["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert sorted(p["protocol"] for p in by_target["dns"]["ports"]) == ["TCP", "UDP"]
    assert all(p["port"] == 53 for p in by_target["dns"]["ports"])
    block = by_target["internet"]["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0" and "ports" not in by_target["internet"]
    excepted = [ipaddress.ip_network(n) for n in block["except"]]
    for address in CLUSTER_ADDRESSES:
        assert any(ipaddress.ip_address(address) in n for n in excepted), address

    # Redis: the API and the sandboxes; the registry: the sandboxes only.
    for name, allowed in (("redis", {"api", "sandbox"}), ("registry", {"sandbox"})):
        (policy,) = policies_for(BASE, component(name))
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        for peer in ("api", "sandbox", "registry", "redis"):
            assert admits(rule["from"], component(peer)) is (peer in allowed), (name, peer)
    # The overlay keeps them.
    assert [d for d in OVERLAY if d["kind"] == "NetworkPolicy"] == [d for d in BASE if d["kind"] == "NetworkPolicy"]


def test_redis_needs_a_password_and_loads_the_documented_users() -> None:
    redis = the(BASE, "StatefulSet", "redis")
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert "--requirepass" not in args  # users come from the ACL file, the default user is off
    assert args[args.index("--aclfile") + 1] == mounted_secret_file(redis, "orchestrator-redis", "users.acl")
    # The probes log in (an unauthenticated PING is refused now) and check the answer.
    assert env_of(container)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": "orchestrator-redis",
        "key": "admin-password",
    }
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert "--user orchestrator-admin" in command[-1] and "grep -qx PONG" in command[-1]
    # Each client logs in as its own ACL user, with its password from the Secret, set before the URL.
    for kind, name, user, key in (
        ("Deployment", "api", "orchestrator-api", "api-password"),
        ("StatefulSet", "sandbox", "orchestrator-worker", "worker-password"),
    ):
        (container,) = pod_spec(the(BASE, kind, name))["containers"]
        names = [e["name"] for e in container["env"]]
        env = env_of(container)
        url = urlsplit(env["REDIS_URL"]["value"])
        assert url.username == user and url.password == "$(REDIS_PASSWORD)", name
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "orchestrator-redis", "key": key}
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), "Kubernetes expands only earlier variables"


def test_the_registry_asks_for_a_login_and_sandboxes_have_one() -> None:
    registry = the(BASE, "Deployment", "registry")
    (container,) = pod_spec(registry)["containers"]
    env = {name: e["value"] for name, e in env_of(container).items()}
    assert env["REGISTRY_AUTH"] == "htpasswd"
    assert env["REGISTRY_AUTH_HTPASSWD_PATH"] == mounted_secret_file(registry, "orchestrator-registry", "htpasswd")
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in container[probe], "/v2/ answers 401 to a probe without a login"
    (sandbox,) = pod_spec(the(BASE, "StatefulSet", "sandbox"))["containers"]
    assert env_of(sandbox)["ORCH_REGISTRY_CREDENTIALS"]["valueFrom"]["secretKeyRef"] == {
        "name": "orchestrator-registry",
        "key": "sandbox-credentials",
    }


def test_make_secrets_gives_every_key_the_manifests_read() -> None:
    generated = generated_secrets()
    for workload, secret, key in secret_refs(BASE):
        if secret != "orchestrator-tokens":  # the API's tokens: secret-tokens.example.yaml
            assert key in generated.get(secret, {}), (workload, secret, key)
    # Fresh passwords on every run.
    generated_secrets.cache_clear()
    assert generated_secrets()["orchestrator-redis"]["api-password"] != generated["orchestrator-redis"]["api-password"]


def test_make_secrets_acl_is_the_documented_one_with_real_hashes() -> None:
    redis = generated_secrets()["orchestrator-redis"]
    users = ("api", "worker", "producer", "admin")
    sha = {k: hashlib.sha256(redis[f"{k}-password"].encode()).hexdigest() for k in users}
    expected = [
        line.replace("#API_PASSWORD_SHA256", f"#{sha['api']}")
        .replace("#WORKER_PASSWORD_SHA256", f"#{sha['worker']}")
        .replace("#PRODUCER_PASSWORD_SHA256", f"#{sha['producer']}")
        for line in documented_acl()
    ]
    expected.append(f"user orchestrator-admin on #{sha['admin']} ~* &* +@all")
    assert redis["users.acl"].splitlines() == expected
    assert expected[0] == "user default off"
    assert all(re.fullmatch(r"[0-9a-f]{64}", redis[f"{k}-password"]) for k in sha), "hex: no URL escaping needed"


def test_make_secrets_htpasswd_holds_both_registry_users() -> None:
    registry = generated_secrets()["orchestrator-registry"]
    lines = dict(line.split(":", 1) for line in registry["htpasswd"].splitlines())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    for key in ("sandbox-credentials", "push-credentials"):
        user, password = registry[key].split(":", 1)
        assert lines[user].startswith("$2"), "the registry accepts bcrypt only"
        assert crypt.crypt(password, lines[user]) == lines[user], user
    assert sorted(lines) == ["orchestrator-push", "orchestrator-sandbox"]
