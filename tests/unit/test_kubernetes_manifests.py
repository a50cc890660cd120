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
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
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
        "REDIS_URL": "redis://redis:6379/0",
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
    assert pod_spec(base)["containers"][0]["securityContext"]["privileged"] is True
    assert "runtimeClassName" not in pod_spec(base)
    assert pod_spec(sysbox)["runtimeClassName"] == "sysbox-runc"
    assert pod_spec(sysbox)["containers"][0]["securityContext"]["privileged"] is False
    # The overlay changes the privilege and nothing else of the sandboxes.
    undo = copy.deepcopy(sysbox)
    del pod_spec(undo)["runtimeClassName"]
    pod_spec(undo)["containers"][0]["securityContext"]["privileged"] = True
    del undo["spec"]["template"]["metadata"]["annotations"]["io.kubernetes.cri-o.userns-mode"]
    assert undo == base
    assert [d for d in OVERLAY if identity(d) != ("StatefulSet", "sandbox")] == [
        d for d in BASE if identity(d) != ("StatefulSet", "sandbox")
    ]


def test_api() -> None:
    api = the(BASE, "Deployment", "api")
    (container,) = pod_spec(api)["containers"]
    assert api["spec"]["replicas"] >= 2
    assert container["args"] == ["orchestrator", "api", "--host", "0.0.0.0", "--port", "8080"]
    env = env_of(container)
    assert env["REDIS_URL"]["value"] == "redis://redis:6379/0"
    # Tokens from the Secret the example shows, which kustomize does not apply.
    ref = env["ORCH_TOKENS"]["valueFrom"]["secretKeyRef"]
    (secret,) = [d for path in EXAMPLES for d in load(path) if d["kind"] == "Secret"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert not any(d["kind"] == "Secret" for d in BASE), "real tokens are not the kustomization's to overwrite"
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
