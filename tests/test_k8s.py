"""The KubeRay manifests under k8s/: render base and overlays, then check them offline.

No cluster and no network. A tiny kustomize renderer lives here so the checks need no kustomize
binary (no maintained PyPI package brings one for Python 3.11); where `kubectl` or `kustomize` is
installed (the google-cloud-cli `kubectl` carries kustomize), its output is compared with ours. The renderer supports
only: `resources` (files or directories with a kustomization.yaml), `patches` with a `target`
(kind and name only) and an inline JSON6902 op list (add / remove / replace), `namespace` (set on
every object; a Namespace object is renamed to it, as kustomize does), and then, as kustomize
orders them, `replacements` that copy one field (a dotted path of map keys, scalar or not) of one
object into fields of others. Anything else in a kustomization.yaml fails the test, so an
unsupported feature can never be silently ignored.

KubeRay objects are validated against the KubeRay CRDs; built-in kinds, and the pods KubeRay makes
from the templates inside them, against Kubernetes' own schemas (kubernetes-validate).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate against the CRDs")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
TARGETS = ["base", "overlays/dev-cpu", "overlays/gpu", "overlays/karpenter"]
JOBS = {"vits-ray-train": "train", "vits-ray-sweep": "tune"}  # RayJob -> the CLI command it runs
# (kind, name) -> its app.kubernetes.io/component label, by which README applies one object alone
COMPONENTS = {("Namespace", "vits-ray"): "namespace", ("ServiceAccount", "vits-ray"): "identity",
              ("ConfigMap", "vits-ray-s3"): "config", ("RayCluster", "vits-ray"): "cluster",
              ("RayJob", "vits-ray-train"): "train", ("RayJob", "vits-ray-sweep"): "sweep"}
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # the CRD has no enum


# --- the renderer -------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_op(doc: dict, op: dict) -> None:
    assert set(op) <= {"op", "path", "value"}, f"unsupported patch op fields: {op}"
    *parents, last = _pointer(op["path"])
    node = doc
    for key in parents:  # a missing parent is an error, as in JSON6902
        node = node[int(key)] if isinstance(node, list) else node[key]
    kind = op["op"]
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else int(last), op["value"])
            return
        index = int(last)
        assert 0 <= index < len(node), f"{op['path']}: index out of range"
        if kind == "replace":
            node[index] = op["value"]
        elif kind == "remove":
            del node[index]
        else:
            raise AssertionError(f"unsupported op {kind!r}")
        return
    if kind in ("replace", "remove"):
        assert last in node, f"{kind} of a missing path {op['path']}"
    if kind in ("add", "replace"):
        node[last] = op["value"]
    elif kind == "remove":
        del node[last]
    else:
        raise AssertionError(f"unsupported op {kind!r}")


def _field(path: str) -> list[str]:
    assert re.fullmatch(r"[\w-]+(\.[\w-]+)*", path), f"unsupported replacement fieldPath {path!r}"
    return path.split(".")


def _selected(docs: list[dict], selector: dict, what: str) -> list[dict]:
    assert set(selector) <= {"kind", "name"}, f"unsupported {what} selector {selector}"
    hits = [d for d in docs if all(d[k] == v if k == "kind" else d["metadata"][k] == v for k, v in selector.items())]
    assert hits, f"{what} {selector} matches nothing"
    return hits


def _replace(docs: list[dict], replacement: dict) -> None:
    """kustomize's `replacements`, inline form: copy the source's field into each target's fields."""
    assert set(replacement) == {"source", "targets"}, f"unsupported replacement {replacement}"
    source = dict(replacement["source"])
    node = _selected(docs, {k: source.pop(k) for k in ("kind", "name") if k in source}, "replacement source")
    assert len(node) == 1 and set(source) == {"fieldPath"}, f"unsupported replacement source {replacement['source']}"
    value = node[0]
    for key in _field(source["fieldPath"]):
        value = value[key]
    for target in replacement["targets"]:
        assert set(target) <= {"select", "fieldPaths", "options"}, f"unsupported replacement target {target}"
        options = target.get("options", {})
        assert set(options) <= {"create"}, f"unsupported replacement options {options}"
        for doc in _selected(docs, target["select"], "replacement target"):
            for path in target["fieldPaths"]:
                *parents, last = _field(path)
                node = doc
                for key in parents:
                    node = node.setdefault(key, {}) if options.get("create") else node[key]
                assert options.get("create") or last in node, f"replacement into a missing field {path}"
                node[last] = copy.deepcopy(value)


def render(directory: Path) -> list[dict]:
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kz) - {"apiVersion", "kind", "resources", "patches", "namespace", "replacements"}
    assert not unsupported, f"{directory}: the test renderer does not support {sorted(unsupported)}"
    docs: list[dict] = []
    for entry in kz.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += render(path)
        else:
            # Via JSON: YAML aliases load as one shared object, and patching one place would
            # change every place that alias appears (kustomize expands them into copies).
            docs += [json.loads(json.dumps(d)) for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kz.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"{directory}: only inline patches with a target: {patch}"
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, f"{directory}: unsupported target selector {target}"
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), f"{directory}: only JSON6902 op lists are supported"
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target.get("name")]
        assert hits, f"{directory}: patch target {target} matches nothing"
        for doc in hits:
            for op in ops:
                _apply_op(doc, op)
    if "namespace" in kz:  # every object we render is namespaced, except the Namespace itself
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = kz["namespace"]
            else:
                doc["metadata"]["namespace"] = kz["namespace"]
    for replacement in kz.get("replacements", []):  # after the patches, as kustomize runs them
        _replace(docs, replacement)
    return docs


@lru_cache(maxsize=None)
def _rendered(target: str) -> tuple:
    return tuple(render(K8S / target))


def rendered(target: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(target)))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --- walking the pods ---------------------------------------------------------------------

def cluster_specs(docs):
    """(where, RayCluster spec) for the RayCluster and every RayJob's own cluster."""
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            yield doc["metadata"]["name"] + ".rayClusterSpec", doc["spec"]["rayClusterSpec"]


def pod_templates(docs):
    """(where, group or None, pod template) for every pod KubeRay creates from these objects."""
    for where, spec in cluster_specs(docs):
        yield f"{where}.head", None, spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}.{group['groupName']}", group, group["template"]
    for job in by_kind(docs, "RayJob"):
        if "submitterPodTemplate" in job["spec"]:
            yield job["metadata"]["name"] + ".submitter", None, job["spec"]["submitterPodTemplate"]


def gpus(container) -> tuple:
    res = container["resources"]
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")


# --- rendering ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_renders(target):
    docs = rendered(target)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Namespace", "RayCluster", "RayJob", "RayJob",
                                               "ServiceAccount"]
    assert {d["metadata"]["name"] for d in by_kind(docs, "RayJob")} == set(JOBS)
    assert not by_kind(docs, "Secret"), "Secrets are created by hand, never committed"


@pytest.mark.parametrize("target", TARGETS)
def test_each_object_can_be_applied_alone(target):
    """`kubectl apply -k DIR -l app.kubernetes.io/component=X` (README) selects exactly one object."""
    docs = rendered(target)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(COMPONENTS)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "vits-ray", doc["metadata"]["name"]
        assert labels.get("app.kubernetes.io/component") == COMPONENTS[doc["kind"], doc["metadata"]["name"]]


@pytest.mark.parametrize("target", TARGETS)
def test_renderer_matches_kustomize(target):
    cmd = (["kustomize", "build"] if shutil.which("kustomize")
           else ["kubectl", "kustomize"] if shutil.which("kubectl") else None)
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed; only the test renderer is used")
    out = subprocess.run([*cmd, str(K8S / target)], capture_output=True, text=True, timeout=60, check=True)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(rendered(target), key=key)


def test_renderer_refuses_what_it_does_not_support(tmp_path):
    (tmp_path / "cm.yaml").write_text("kind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(AssertionError, match="does not support"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap, name: b}\n    patch: '[]'\n")
    with pytest.raises(AssertionError, match="matches nothing"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(  # a list index in a fieldPath: not supported here
        "resources: [cm.yaml]\nreplacements:\n  - source: {kind: ConfigMap, name: a, fieldPath: metadata.name}\n"
        "    targets: [{select: {kind: ConfigMap}, fieldPaths: ['spec.list[0]']}]\n")
    with pytest.raises(AssertionError, match="unsupported replacement fieldPath"):
        render(tmp_path)


# --- the CRD schemas ----------------------------------------------------------------------

def _crd_dir() -> Path | None:
    for candidate in (os.environ.get("KUBERAY_CRDS"),
                      REPO.parent / "shared" / "kuberay-crds", REPO / "shared" / "kuberay-crds"):
        if candidate and (Path(candidate) / "ray.io_rayjobs.yaml").is_file():
            return Path(candidate)
    return None


def _strict(schema):
    """Close every object schema that lists its properties, so a misspelt field is an error."""
    if isinstance(schema, list):
        for item in schema:
            _strict(item)
        return
    if not isinstance(schema, dict):
        return
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for key, value in schema.items():
        if key == "properties":  # a map of field name -> schema; field names are not keywords
            for sub in value.values():
                _strict(sub)
        else:
            _strict(value)


@lru_cache(maxsize=None)
def validator(kind: str):
    crds = _crd_dir()
    if crds is None:
        pytest.skip("KubeRay CRDs not found (expected ../shared/kuberay-crds beside the repo, or $KUBERAY_CRDS)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crds / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    _strict(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_objects_match_the_crds(target):
    for doc in rendered(target):
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert schema_errors(doc) == [], doc["kind"]


def test_a_misspelt_field_is_rejected():
    job = by_kind(rendered("base"), "RayJob")[0]
    job["spec"]["shutdownAfterJobFinishe"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinishe" in e for e in schema_errors(job))
    cluster = by_kind(rendered("base"), "RayCluster")[0]
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert any("securityContex" in e for e in schema_errors(cluster))


# --- built-in kinds: Kubernetes' own schemas ----------------------------------------------

def k8s_versions() -> list[str]:
    """The oldest and newest Kubernetes minors kubernetes-validate has schemas for."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is needed")
    versions = utils.all_versions()
    return sorted({utils.major_minor(versions[0]), utils.major_minor(versions[-1])})


def builtin_objects(docs):
    """(where, object of a built-in kind) for every such object rendered, and for each pod KubeRay
    creates from the templates inside the KubeRay objects: a Ray pod template as a `PodTemplate`
    (the head's with the autoscaler sidecar KubeRay adds from `autoscalerOptions`), the submitter's
    as the `batch/v1 Job` it becomes in K8sJobMode."""
    for doc in docs:
        if not doc["apiVersion"].startswith("ray.io/"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc
    for where, spec in cluster_specs(docs):
        head = copy.deepcopy(spec["headGroupSpec"]["template"])
        if spec.get("enableInTreeAutoscaling"):
            options = spec.get("autoscalerOptions", {})
            sidecar = {"name": "autoscaler", "image": options.get("image", head["spec"]["containers"][0]["image"])}
            sidecar.update({k: options[k] for k in ("imagePullPolicy", "env", "envFrom", "resources",
                                                     "securityContext", "volumeMounts") if k in options})
            head["spec"]["containers"].append(sidecar)
        groups = [("head", head)] + [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
        for group, template in groups:
            yield f"{where}.{group}", {"apiVersion": "v1", "kind": "PodTemplate",
                                       "metadata": {"name": f"{where}.{group}".lower()}, "template": template}
    for job in by_kind(docs, "RayJob"):
        if job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode" and "submitterPodTemplate" in job["spec"]:
            spec = {"template": job["spec"]["submitterPodTemplate"]}
            spec.update({k: v for k, v in job["spec"].get("submitterConfig", {}).items() if k == "backoffLimit"})
            yield f"{job['metadata']['name']}.submitter", {"apiVersion": "batch/v1", "kind": "Job",
                                                           "metadata": {"name": job["metadata"]["name"]}, "spec": spec}


def builtin_errors(obj: dict) -> list[str]:
    """kubernetes-validate's verdict in strict mode (unknown fields refused), for each version."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is needed")
    errors = []
    for version in k8s_versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{version} {'/'.join(map(str, err.absolute_path))}: {err.message}")
    return errors


@pytest.mark.parametrize("target", TARGETS)
def test_builtin_kinds_and_pod_templates_match_the_kubernetes_schemas(target):
    objects = dict(builtin_objects(rendered(target)))
    kinds = sorted(o["kind"] for o in objects.values())
    # ConfigMap, Namespace, ServiceAccount; each cluster (RayCluster and both RayJobs') has a head
    # and a worker group; two submitters.
    assert kinds == ["ConfigMap", "Job", "Job", "Namespace"] + ["PodTemplate"] * 6 + ["ServiceAccount"], kinds
    for where, obj in objects.items():
        assert builtin_errors(obj) == [], where


def test_a_misspelt_builtin_field_is_refused():
    objects = dict(builtin_objects(rendered("base")))
    config = objects["ConfigMap/vits-ray-s3"]
    config["dta"] = config.pop("data")
    assert any("'dta' was unexpected" in e for e in builtin_errors(config))
    worker = objects["vits-ray.gpu"]
    worker["template"]["spec"]["containers"][0]["imagePullPolic"] = "Always"
    assert any("'imagePullPolic' was unexpected" in e for e in builtin_errors(worker))
    head = objects["vits-ray-sweep.rayClusterSpec.head"]  # the autoscaler sidecar is checked too
    head["template"]["spec"]["containers"][-1]["securityContext"]["runAsNonRoot"] = "yes"
    assert any("runAsNonRoot" in e and "'yes' is not of type 'boolean'" in e for e in builtin_errors(head))
    submitter = objects["vits-ray-sweep.submitter"]
    submitter["spec"]["template"]["spec"]["restartPolicy"] = ["Never"]
    assert builtin_errors(submitter)


# --- what the pods must satisfy -----------------------------------------------------------

def assert_restricted(where, security, pod_level):
    """The fields the "restricted" Pod Security Standard requires, set explicitly."""
    assert security, f"{where}: no securityContext"
    assert security.get("runAsNonRoot") is True, where
    assert security.get("runAsUser", 0) != 0, where
    assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    if not pod_level:
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("privileged"), where


def assert_resources(where, resources):
    for part in ("requests", "limits"):
        for name in ("cpu", "memory"):
            assert name in resources.get(part, {}), f"{where}: no {part}.{name}"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_restricted_and_bounded(target):
    docs = rendered(target)
    for where, group, template in pod_templates(docs):
        spec = template["spec"]
        assert_restricted(where, spec.get("securityContext"), pod_level=True)
        for container in spec["containers"] + spec.get("initContainers", []):
            name = f"{where}/{container['name']}"
            assert_restricted(name, container.get("securityContext"), pod_level=False)
            assert_resources(name, container.get("resources", {}))
            requested, limited = gpus(container)
            if group is not None and (requested or limited or container["image"].endswith("-gpu")):
                assert requested == limited and limited and int(limited) >= 1, f"{name}: GPU request != limit"
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
                    in spec.get("tolerations", []), f"{name}: the GPU taint is not tolerated"
        for volume in spec.get("volumes", []):  # restricted allows only these volume types
            assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected",
                                              "downwardAPI", "persistentVolumeClaim", "ephemeral", "csi"}
    for where, spec in cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True, where
        autoscaler = spec.get("autoscalerOptions", {})  # KubeRay adds this sidecar to the head pod
        assert_restricted(f"{where}.autoscaler", autoscaler.get("securityContext"), pod_level=False)
        assert_resources(f"{where}.autoscaler", autoscaler.get("resources", {}))


NAMESPACE = "vits-ray"
PSS = "pod-security.kubernetes.io/"


@pytest.mark.parametrize("target", TARGETS)
def test_everything_is_in_a_namespace_that_enforces_restricted(target):
    """The restricted standard is enforced by admission, not only met by our pods."""
    docs = rendered(target)
    (namespace,) = by_kind(docs, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels[PSS + "enforce"] == "restricted"
    assert labels[PSS + "audit"] == labels[PSS + "warn"] == "restricted"
    assert labels.get(PSS + "enforce-version", "latest") == "latest" or \
        re.fullmatch(r"v1\.\d+", labels[PSS + "enforce-version"])
    for doc in docs:
        if doc is not namespace:
            assert doc["metadata"].get("namespace") == NAMESPACE, (doc["kind"], doc["metadata"]["name"])


def test_overlays_choose_the_worker_flavour():
    def gpu_groups(target):
        return [g for _, g, t in pod_templates(rendered(target)) if g and any(gpus(c)[1] for c in t["spec"]["containers"])]
    assert gpu_groups("base") and gpu_groups("overlays/gpu")
    assert not gpu_groups("overlays/dev-cpu")
    assert "nvidia.com" not in yaml.safe_dump(rendered("overlays/dev-cpu"))


# --- placement ------------------------------------------------------------------------------

# The documented capacity-type labels a node carries: key -> (on-demand value, spot value).
CAPACITY_TYPE = {"eks.amazonaws.com/capacityType": ("ON_DEMAND", "SPOT"),   # EKS managed node groups
                 "karpenter.sh/capacity-type": ("on-demand", "spot")}       # Karpenter
# Instance classes a worker group may name (node.kubernetes.io/instance-type): vCPU, GiB, GPUs.
INSTANCES = {"g5.xlarge": (4, 16, 1)}
# What a node keeps from its pods: EKS's kube-reserved (about 0.1 CPU; 255 MiB + 11 MiB per pod, 58
# pods on a g5.xlarge), the kubelet's 100 MiB eviction threshold, the kernel's share of the nominal
# memory and the DaemonSets (aws-node, kube-proxy, the NVIDIA device plugin, CSI): rounded up.
SYSTEM_RESERVE = (0.5, 2.5)  # vCPU, GiB


def memory_gib(quantity) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity)).groups()
    scale = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(number) * scale.get(unit, 1) / 2**30


def capacity_type(where, selector: dict) -> str:
    """'on-demand' or 'spot', from the one capacity-type label the pod selects on."""
    keys = [k for k in selector if k in CAPACITY_TYPE]
    assert len(keys) == 1, f"{where}: no capacity-type nodeSelector (one of {sorted(CAPACITY_TYPE)})"
    on_demand, spot = CAPACITY_TYPE[keys[0]]
    assert selector[keys[0]] in (on_demand, spot), f"{where}: {keys[0]}={selector[keys[0]]}"
    return "on-demand" if selector[keys[0]] == on_demand else "spot"


@pytest.mark.parametrize("target", TARGETS)
def test_head_and_submitter_on_demand_gpu_workers_on_spot(target):
    """A spot reclaim of the head (no GCS fault tolerance) or of the submitter ends the run; a
    reclaimed worker only costs a resume from the last checkpoint. All pods use one label family."""
    families = set()
    for where, group, template in pod_templates(rendered(target)):
        selector = template["spec"].get("nodeSelector", {})
        families |= {k for k in selector if k in CAPACITY_TYPE}
        wanted = "on-demand" if group is None else "spot"
        assert capacity_type(where, selector) == wanted, where
    assert len(families) == 1, families


def launcher_gpu_worker() -> dict:
    """cluster/aws.yaml's GPU node type (the `ray up` launcher), which the manifests must agree with."""
    nodes = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["available_node_types"]
    gpu_nodes = [n for n in nodes.values() if n.get("resources", {}).get("GPU")]
    assert len(gpu_nodes) == 1
    return gpu_nodes[0]


@pytest.mark.parametrize("target", TARGETS)
def test_workers_fit_their_instance_class_with_its_system_reserve(target):
    launcher = launcher_gpu_worker()
    for where, group, template in pod_templates(rendered(target)):
        if group is None:
            continue
        instance = template["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
        container = template["spec"]["containers"][0]
        if gpus(container)[1]:  # GPU workers name the instance class they are sized for
            assert instance == launcher["node_config"]["InstanceType"], f"{where}: {instance}"
            assert launcher["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            assert int(gpus(container)[1]) == launcher["resources"]["GPU"] == INSTANCES[instance][2], where
        if instance is None:
            continue
        vcpu, gib, _ = INSTANCES[instance]
        requests = container["resources"]["requests"]
        assert cpus(requests["cpu"]) <= vcpu - SYSTEM_RESERVE[0], f"{where}: {requests['cpu']} CPU on {instance}"
        assert memory_gib(requests["memory"]) <= gib - SYSTEM_RESERVE[1], f"{where}: {requests['memory']} on {instance}"


# Ray (python/ray/_private/services.py, determine_plasma_store_config) puts the object store in
# /dev/shm only when /dev/shm has more bytes free than the store; else in /tmp (on disk), or, for
# an explicit size over 10 GB, it refuses to start. Its minimum is 75 MiB.
OBJECT_STORE_MIN = 75 * 2**20


@pytest.mark.parametrize("target", TARGETS)
def test_object_store_fits_in_dev_shm_in_every_group(target):
    docs = rendered(target)
    for where, spec in cluster_specs(docs):
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            pod = group["template"]["spec"]
            store = group["rayStartParams"].get("object-store-memory")
            assert store and str(store).isdigit(), f"{where}.{name}: object-store-memory not set in bytes"
            store = int(store) / 2**30
            (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["emptyDir"]["medium"] == "Memory", f"{where}.{name}"
            shm = memory_gib(volume["emptyDir"]["sizeLimit"])
            assert OBJECT_STORE_MIN / 2**30 <= store < shm, f"{where}.{name}: store {store} GiB, /dev/shm {shm} GiB"
            # A memory-backed /dev/shm is charged to the pod's memory limit.
            assert shm < memory_gib(container["resources"]["limits"]["memory"]), f"{where}.{name}"


def test_launcher_head_is_on_demand_too():
    nodes = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["available_node_types"]
    assert "InstanceMarketOptions" not in nodes["head"]["node_config"]


def job_named(docs: list[dict], name: str) -> dict:
    (job,) = [d for d in by_kind(docs, "RayJob") if d["metadata"]["name"] == name]
    return job


@pytest.mark.parametrize("target", TARGETS)
def test_each_job_runs_on_its_own_cluster_shaped_like_the_raycluster(target):
    docs = rendered(target)
    (cluster,) = by_kind(docs, "RayCluster")
    train = job_named(docs, "vits-ray-train")
    for name in JOBS:
        spec = job_named(docs, name)["spec"]
        assert spec["rayClusterSpec"] == cluster["spec"], f"{name}.rayClusterSpec drifted from the RayCluster"
        assert spec["submitterPodTemplate"] == train["spec"]["submitterPodTemplate"], name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0, name
        assert spec["backoffLimit"] >= 1, name  # a retry resumes: fixed --name (test_*_entrypoint_*)
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, name
        # jobs/*.py and --space files are resolved against the repo inside the image.
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/vits-ray", name


# --- secrets --------------------------------------------------------------------------------

def env_entries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_come_only_from_secret_refs(target):
    for entry in env_entries(rendered(target)):
        if entry["name"] in SECRET_ENV:
            assert "value" not in entry, f"{entry['name']} has a literal value"
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{entry['name']} is not from a Secret"


# The Secret KubeRay reads the token from (authOptions.secretName), and the one key it reads
# (RAY_AUTH_TOKEN_SECRET_KEY in KubeRay 1.7's ray-operator/controllers/ray/utils/constant.go).
AUTH_SECRET, AUTH_SECRET_KEY = "vits-ray-auth", "auth_token"


@pytest.mark.parametrize("target", TARGETS)
def test_token_auth_is_kuberays(target):
    """Every cluster (the RayCluster and each RayJob's) has authOptions mode token with our Secret:
    KubeRay then injects the token into every Ray pod and the submitter, and sends it with its own
    dashboard calls. A token variable of ours would shadow the injected one, so there is none."""
    docs = rendered(target)
    specs = dict(cluster_specs(docs))
    assert len(specs) == 3, sorted(specs)
    for where, spec in specs.items():
        assert spec.get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}, where
    for entry in env_entries(docs):
        assert not entry["name"].startswith("RAY_AUTH"), f"{entry['name']}: KubeRay injects it"
        assert entry.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != AUTH_SECRET, entry["name"]
    for where, _, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name") != AUTH_SECRET, f"{where}/{container['name']}"


def test_readme_creates_the_token_secret_with_kuberays_key():
    readme = (REPO / "README.md").read_text()
    created = re.findall(r"kubectl( -n \S+)? create secret generic " + AUTH_SECRET + r" ([^\n]+)", readme)
    assert created, "README does not say how to create the token Secret"
    for _, args in created:
        assert f"--from-literal={AUTH_SECRET_KEY}=" in args or f"--from-file={AUTH_SECRET_KEY}=" in args, args


AWS_KEY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
IRSA_ROLE = "eks.amazonaws.com/role-arn"


@pytest.mark.parametrize("target", TARGETS)
def test_s3_access_is_irsa_not_keys(target):
    """Head and workers run as a ServiceAccount whose IAM role (IRSA) reaches S3; no pod reads an
    AWS key, from a variable or from a Secret."""
    docs = rendered(target)
    (account,) = by_kind(docs, "ServiceAccount")
    role = account["metadata"].get("annotations", {}).get(IRSA_ROLE, "")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role
    for where, group, template in pod_templates(docs):
        spec = template["spec"]
        if not where.endswith(".submitter"):  # the submitter only talks to the dashboard
            assert spec.get("serviceAccountName") == account["metadata"]["name"], where
        for container in spec["containers"] + spec.get("initContainers", []):
            names = {e["name"] for e in container.get("env", [])}
            assert not names & AWS_KEY_ENV, f"{where}/{container['name']}: {names & AWS_KEY_ENV}"
            assert not [s for s in container.get("envFrom", []) if "secretRef" in s], f"{where}/{container['name']}"
    for entry in env_entries(docs):  # the autoscaler's env too
        assert entry["name"] not in AWS_KEY_ENV, entry["name"]
    for volume in (v for _, _, t in pod_templates(docs) for v in t["spec"].get("volumes", [])):
        assert "secret" not in volume, volume["name"]


def test_readme_puts_no_aws_key_on_a_command_line():
    readme = (REPO / "README.md").read_text()
    for name in AWS_KEY_ENV:
        assert not re.search(rf"{name}=(?!\$)", readme), f"README puts {name} on a command line"


def test_no_aws_key_is_committed():
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text()), f"{path} holds what looks like an AWS key"


# --- versions and the entrypoint ------------------------------------------------------------

def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [d.split("==")[1] for d in deps if re.match(r"ray(\[.*\])?==", d)]
    return version


@pytest.mark.parametrize("target", TARGETS)
def test_ray_version_and_images_are_pinned(target):
    docs, ray = rendered(target), pinned_ray()
    for where, spec in cluster_specs(docs):
        assert spec["rayVersion"] == ray, where
    for where, _, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert re.fullmatch(rf"[\w./-]+/vits-ray:[\w.]+-ray{re.escape(ray)}-py311-(cpu|gpu)", image), \
                f"{where}: image {image} does not pin Ray {ray}"


def pinned_torch() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [d.split("==")[1] for d in deps if d.startswith("torch==")]
    return version


def test_image_flavours_install_the_right_torch():
    """The -cpu image (head, submitter) installs torch's CPU build of the pinned version, from
    PyTorch's CPU index, and only when built as the CPU flavour; both flavours start from Ray's
    plain image, so the GPU one's CUDA is torch's own (no CUDA toolkit in the base to disagree)."""
    text = (REPO / "cluster" / "Dockerfile").read_text()
    code = re.sub(r"\\\n\s*", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(pinned_ray())}-py311$", code, re.M)
    assert re.search(r"^ARG TORCH_FLAVOUR=gpu$", code, re.M)
    (cpu,) = [ln for ln in code.splitlines() if "torch==" in ln and "pip install" in ln]
    assert re.search(r'if \[ "\$TORCH_FLAVOUR" = cpu \]; then\s+pip install ', cpu), cpu
    assert f"torch=={pinned_torch()}+cpu" in cpu.split(), cpu
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu, cpu
    assert "TORCH_FLAVOUR=cpu" in text  # how to build it (the header's docker build line)
    readme = (REPO / "README.md").read_text() + (REPO / "cluster" / "README.md").read_text()
    assert re.search(r"driver\D{0,40}580", readme), "the minimum NVIDIA driver for CUDA 13 is not stated"


def entrypoint_params(job: dict) -> dict:
    """The job's entrypoint parsed by the real click command it runs (`jobs/<command>.py`)."""
    from vits_ray.cli import main

    command = JOBS[job["metadata"]["name"]]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{command}.py"] and (REPO / "jobs" / f"{command}.py").is_file()
    # Not resilient: an unknown or renamed option, or a missing required one, raises here.
    return main.commands[command].make_context(f"jobs/{command}.py", argv[2:]).params


def cpus(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_slots(job: dict, gpu: bool, cpus_per_worker: int) -> int:
    """Ray Train workers the job's own cluster holds at full scale: per pod, its GPUs, or its CPUs
    over each worker's (the head trains nothing: num-cpus 0, no GPU)."""
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    slots = 0
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = int(limits.get("nvidia.com/gpu", 0)) if gpu else int(cpus(limits["cpu"]) // cpus_per_worker)
        slots += group["maxReplicas"] * per_pod
    return slots


def total_cpus(job: dict) -> float:
    return sum(g["maxReplicas"] * cpus(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])


@pytest.mark.parametrize("target", TARGETS)
def test_training_entrypoint_parses_with_the_real_cli_and_fits(target):
    from vits_ray.config import load_config

    job = job_named(rendered(target), "vits-ray-train")
    params = entrypoint_params(job)
    assert params["name"] and params["storage"].startswith("s3://") and params["data"].startswith("s3://")
    load_config(params["config_path"], params["overrides"])  # the recipe exists and is valid
    # The job must fit in the cluster it brings up, or it waits forever for workers.
    capacity = worker_slots(job, params["gpu"], params["cpus_per_worker"])
    assert 1 <= params["workers"] <= capacity, f"--workers {params['workers']} > capacity {capacity}"


# Each trial's own function (the trainable that drives its Train run) asks for this much CPU
# (`tune.with_resources(..., {"CPU": 0.01})` in vits_ray/tune/sweep.py); its workers come on top.
TRIAL_CPU = 0.01


@pytest.mark.parametrize("target", TARGETS)
def test_sweep_entrypoint_parses_with_the_real_cli_and_fits(target):
    from vits_ray.config import RECIPE_DIR, load_config
    from vits_ray.tune.space import load_space

    docs = rendered(target)
    job = job_named(docs, "vits-ray-sweep")
    params = entrypoint_params(job)
    assert params["name"] and params["storage"].startswith("s3://") and params["data"].startswith("s3://")
    cfg = load_config(params["config_path"], params["overrides"])
    # The space file is in the repo (the job's working dir), and every key and range fits the recipe.
    space = REPO / params["space_path"] if params["space_path"] else RECIPE_DIR / "tune_lr.toml"
    assert space.is_file(), space
    assert load_space(space, cfg).keys
    assert params["workers"] >= 1 and 1 <= params["concurrent"] <= params["trials"]
    assert params["max_steps"] >= 1
    # It tunes what the training job of the same overlay trains: the same recipe, shards and
    # device, but in a place of its own.
    train = entrypoint_params(job_named(docs, "vits-ray-train"))
    assert (params["config_path"], params["overrides"], params["data"], params["gpu"]) == \
        (train["config_path"], train["overrides"], train["data"], train["gpu"])
    assert f"{params['storage']}/{params['name']}" != f"{train['storage']}/{train['name']}"
    # All --concurrent trials at once must fit the cluster the job brings up, or Tune holds trials
    # back that --concurrent promised (or, over the autoscaler's maximum, waits forever).
    per_worker = params["cpus_per_worker"]
    at_once = params["concurrent"] * params["workers"]
    capacity = worker_slots(job, params["gpu"], per_worker)
    assert at_once <= capacity, f"--concurrent {params['concurrent']} x --workers {params['workers']} > {capacity}"
    cpu_needed = params["concurrent"] * TRIAL_CPU + (0 if params["gpu"] else at_once * per_worker)
    assert cpu_needed <= total_cpus(job)
