"""deploy/: the Kubernetes manifests against the Kubernetes and KServe schemas, the packratd.toml they
carry against packratd's own option table, the manifests against each other, and the container
build as far as it can be checked without a container engine (none on these machines: `docker
build` / `podman build` and a cluster were never run here; docs/kubernetes.md says what that leaves).

* Built-in kinds: kubernetes-validate (its bundled JSON schemas, strict: unknown fields are errors,
  as `kubectl apply --validate=strict` and the API server's field validation make them), for every
  Kubernetes release it ships from 1.33 on.
* ServingRuntime: the openAPIV3Schema of KServe v0.20.0's CRD, vendored in tests/data/kserve/ (see
  its README for the source), with jsonschema; unknown fields made errors the same way.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from packratd import config as config_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
MANIFESTS = sorted(glob.glob(os.path.join(DEPLOY, "kubernetes", "*.yaml")))
SR_SCHEMA = os.path.join(ROOT, "tests", "data", "kserve", "servingruntime-v1alpha1.schema.json")
K8S_VERSIONS = [v for v in kubernetes_validate.utils.all_versions() if Version(v) >= Version("1.33")]
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}            # kserve pkg/constants (v0.20.0)
KSERVE_BUILTIN_FORMATS = {"sklearn", "xgboost", "lightgbm", "tensorflow", "pytorch", "onnx", "triton", "tensorrt",
                          "mlflow", "paddle", "pmml", "huggingface"}
KNOWN_NOT_BUILTIN = {"ServingRuntime"}


def _docs():
    out = []
    for path in MANIFESTS:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    out.append((os.path.relpath(path, ROOT), doc))
    return out


DOCS = _docs()


def one(kind: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def _strict(schema):
    """An OpenAPI v3 structural schema where an object with listed properties refuses any other key
    (what the API server's strict field validation does), unless it says it keeps unknown fields."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(s)
    return s


def servingruntime_validator():
    with open(SR_SCHEMA) as f:
        schema = json.load(f)
    return jsonschema.Draft7Validator(_strict(schema))


def _errors_sr(doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in servingruntime_validator().iter_errors(doc)]


# ---- schemas ---------------------------------------------------------------------------------------


def test_every_manifest_file_is_covered():
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "NetworkPolicy", "Service", "ServingRuntime"], kinds
    assert K8S_VERSIONS and K8S_VERSIONS[-1] == kubernetes_validate.latest_version()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("where,doc", [(w, d) for w, d in DOCS if d["kind"] not in KNOWN_NOT_BUILTIN],
                         ids=lambda x: x if isinstance(x, str) else x.get("kind", "?"))
def test_manifest_is_valid_kubernetes(where, doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where} ({doc['kind']}) invalid for Kubernetes {version}: "
                    f"{'/'.join(map(str, e.path))}: {e.message}")


def test_kubernetes_validation_can_fail():
    """The same validation refuses a misspelt field, a wrong type and a missing required field."""
    for mutate in (lambda c: c.update(imagee="x"),
                   lambda c: c["resources"]["limits"].update(cpu=[28]),
                   lambda c: c.pop("name")):
        bad = copy.deepcopy(one("DaemonSet"))
        mutate(bad["spec"]["template"]["spec"]["containers"][0])
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_validation_is_offline(monkeypatch):
    """kubernetes-validate ships its schemas and the KServe one is vendored: nothing opens a socket."""
    def no_network(*a, **k):
        raise AssertionError("schema validation tried to use the network")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    kubernetes_validate.validate(one("DaemonSet"), K8S_VERSIONS[-1], strict=True)
    assert _errors_sr(one("ServingRuntime")) == []


def test_servingruntime_matches_the_kserve_crd():
    sr = one("ServingRuntime")
    assert sr["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert _errors_sr(sr) == []
    # the CRD's metadata is only {type: object}: hold it to Kubernetes' ObjectMeta rules ourselves
    meta = sr["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    assert set(meta) <= {"name", "namespace", "labels", "annotations"}
    assert all(isinstance(v, str) for v in {**meta.get("labels", {}), **meta.get("annotations", {})}.values())
    spec = sr["spec"]
    assert set(spec["protocolVersions"]) <= KSERVE_PROTOCOLS and "v2" in spec["protocolVersions"]
    formats = spec["supportedModelFormats"]
    assert formats and all(f["name"] not in KSERVE_BUILTIN_FORMATS for f in formats), formats
    assert all(isinstance(v, str) for v in spec["annotations"].values())


def test_servingruntime_validation_can_fail():
    sr = one("ServingRuntime")
    for path, value in ((("spec", "supportedModelFormats"), "torch-export"),      # not a list
                        (("spec", "protocolVersion"), ["v2"]),                    # misspelt key
                        (("spec", "containers"), None),                           # required, removed
                        (("spec", "supportedModelFormats", 0, "priority"), 0)):   # minimum 1
        bad = copy.deepcopy(sr)
        node = bad
        for k in path[:-1]:
            node = node[k]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        assert _errors_sr(bad), path


def test_vendored_crd_schema_is_the_servingruntime_one():
    with open(SR_SCHEMA) as f:
        schema = json.load(f)
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["containers"]
    assert {"supportedModelFormats", "protocolVersions", "containers", "volumes"} <= set(spec["properties"])
    with open(os.path.join(os.path.dirname(SR_SCHEMA), "README.md")) as f:
        readme = f.read()
    assert "v0.20.0" in readme and "config/crd/full/serving.kserve.io_servingruntimes.yaml" in readme


# ---- the config inside the manifests ----------------------------------------------------------------


def configmap_config(tmp_path) -> config_mod.Config:
    path = tmp_path / "packratd.toml"
    path.write_text(one("ConfigMap")["data"]["packratd.toml"])
    return config_mod.load(str(path))


def test_configmap_is_a_valid_packratd_config(tmp_path):
    cfg = configmap_config(tmp_path)
    assert cfg["server.listen"].startswith("tcp://") and cfg["server.curve"] is True
    assert cfg["oip.http_listen"] and cfg["oip.grpc_listen"] and cfg["metrics.port"] > 0
    assert cfg["metrics.address"] == "0.0.0.0"
    # and a broken one is refused, so the check above means something
    bad = tmp_path / "bad.toml"
    bad.write_text(one("ConfigMap")["data"]["packratd.toml"].replace("[oip]", "[oip]\nhttp_listn = 1"))
    with pytest.raises(config_mod.ConfigError, match="unknown key oip.http_listn"):
        config_mod.load(str(bad))


def _cli_config(args: list[str]) -> config_mod.Config:
    """The container's args through packratd's own command line, then the option table."""
    from packratd.cli import parse_args
    a = parse_args(args)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    for key, val in (("model.path", a.model), ("workers.plan", a.plan), ("server.listen", a.listen),
                     ("server.runtime_dir", a.runtime_dir), ("server.state_dir", a.state_dir)):
        if val is not None:
            overrides[key] = val
    return config_mod.load(a.config, overrides)


def test_servingruntime_args_are_a_valid_packratd_command_line():
    c = one("ServingRuntime")["spec"]["containers"][0]
    args = [a.replace("{{.Name}}", "resnet50") for a in c["args"]]
    assert "{{.Name}}" in " ".join(c["args"])
    cfg = _cli_config(args)
    assert cfg["model.path"].startswith("/mnt/models/")                   # KServe's storage initializer
    assert cfg["oip.model_name"] == "resnet50"
    assert cfg["oip.http_listen"].endswith(":8080") and cfg["oip.http_listen"].split(":")[0] == "0.0.0.0"
    assert int(one("ServingRuntime")["spec"]["annotations"]["prometheus.kserve.io/port"]) == cfg["metrics.port"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PACKRATD_RUNTIME_DIR"] == cfg["server.runtime_dir"]
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    for key in ("server.runtime_dir", "server.state_dir"):
        assert any(_under(cfg[key], m) for m in mounts), (key, cfg[key], mounts)
    assert c["ports"][0]["containerPort"] == 8080


# ---- the manifests against each other ------------------------------------------------------------------


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _guaranteed_integer_cpus(where, containers, smt=2):
    for c in containers:
        r = c["resources"]
        assert r["requests"] == r["limits"], f"{where} {c['name']}: requests != limits (not Guaranteed)"
        assert set(r["limits"]) >= {"cpu", "memory"}, f"{where} {c['name']}: cpu and memory limits needed"
        cpu = str(r["limits"]["cpu"])
        assert cpu.isdigit() and int(cpu) % smt == 0, \
            f"{where} {c['name']}: cpu {cpu!r} must be a whole number of whole SMT-{smt} cores (full-pcpus-only)"


def test_daemonset_is_guaranteed_with_whole_cores():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    _guaranteed_integer_cpus("DaemonSet", _containers(pod))
    _guaranteed_integer_cpus("ServingRuntime", one("ServingRuntime")["spec"]["containers"])


def test_daemonset_agrees_with_its_config(tmp_path):
    cfg = configmap_config(tmp_path)
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # the config file the args name is the ConfigMap, mounted there
    args = c["args"]
    conf = args[args.index("--config") + 1]
    m = mounts[os.path.dirname(conf)]
    v = volumes[m["name"]]
    assert v["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert os.path.basename(conf) in [i["path"] for i in v["configMap"]["items"]]
    assert _cli_config(args[:args.index("--config")] + ["--config", str(tmp_path / "packratd.toml")]).values == cfg.values

    # the ports the config listens on are the container's
    assert ports["zmq"] == _port(cfg["server.listen"])
    assert ports["http"] == _port(cfg["oip.http_listen"]) and ports["grpc"] == _port(cfg["oip.grpc_listen"])
    assert ports["metrics"] == cfg["metrics.port"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports, probe
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"

    # read-only root: every path packratd writes is a volume, each of the right kind
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    def volume_of(path):
        best = max((p for p in mounts if _under(path, p)), key=len, default=None)
        assert best is not None, f"{path} is on no volume (the root filesystem is read-only)"
        return volumes[mounts[best]["name"]], mounts[best]
    assert "emptyDir" in volume_of(cfg["server.runtime_dir"])[0]
    assert "emptyDir" in volume_of(cfg["server.curve_keys_dir"])[0]
    state, state_mount = volume_of(cfg["server.state_dir"])
    assert state["hostPath"]["type"] == "DirectoryOrCreate" and not state_mount.get("readOnly")
    model, model_mount = volume_of(cfg["model.path"])
    assert "hostPath" in model and model_mount.get("readOnly") is True
    clients, _ = volume_of(cfg["server.curve_clients_dir"])
    assert "secret" in clients
    assert "emptyDir" in volume_of("/tmp")[0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PACKRATD_RUNTIME_DIR"] == cfg["server.runtime_dir"]

    # the init containers put the CURVE key where the config says, and own the state dir for uid 10001
    init = {i["name"]: i for i in pod["initContainers"]}
    key_cmd = " ".join(init["curve-key"]["command"])
    assert os.path.join(cfg["server.curve_keys_dir"], "server.key_secret") in key_cmd and "-m 0600" in key_cmd
    uid = pod["securityContext"]["runAsUser"]
    assert f"chown {uid}:{uid} {cfg['server.state_dir']}" in " ".join(init["state-dir-owner"]["command"])

    # SIGTERM drains: the grace period covers 3 x stop_grace_s + 5 s (docs/operations.md, Stop and drain)
    assert pod["terminationGracePeriodSeconds"] >= 3 * cfg["workers.stop_grace_s"] + 5


def test_startup_budget_covers_first_start_profiling(tmp_path):
    """Sized from BENCHMARKS.md: profiling 20 points (2 thread counts x 10 batch sizes) took 62-118 s on
    the 2-core VM (ResNet-50, BERT-base, GPT-2), so at most ~6 s a point; start-up to serving added up
    to 100 s more (interference check, worker boots).  A 16-core NUMA node profiles 16 thread counts."""
    from packratd.profiler import batch_grid, thread_grid
    cfg = configmap_config(tmp_path)
    points = len(thread_grid(16)) * len(batch_grid(cfg["server.max_batch_size"]))
    need_s = points * 6.0 + 100
    for c in (one("DaemonSet")["spec"]["template"]["spec"]["containers"][0], one("ServingRuntime")["spec"]["containers"][0]):
        p = c["startupProbe"]
        budget = p["periodSeconds"] * p["failureThreshold"]
        assert budget >= 1.5 * need_s, (c["name"], budget, need_s)


def test_service_and_policy_select_the_daemonset_pods():
    pod = one("DaemonSet")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    svc = one("Service")
    assert svc["spec"]["clusterIP"] == "None"                           # headless: DNS lists every ready pod
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == ports
    assert one("DaemonSet")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    np_ = one("NetworkPolicy")
    assert np_["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in np_["spec"]["ingress"] for p in rule["ports"]} == ports
    ns = one("Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace", ns) == ns for _, d in DOCS if d["kind"] != "Namespace")


# ---- the container build ---------------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Containerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not cur and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):
                continue                                                # a comment inside a continued RUN
            if line.endswith("\\"):
                cur += line[:-1] + " "
                continue
            cur += line
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def test_containerfile_builds_what_the_docs_say():
    ins = containerfile_instructions()
    words = [w for w, _ in ins]
    assert set(words) <= {"ARG", "FROM", "RUN", "WORKDIR", "COPY", "ENV", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}, words
    assert "HEALTHCHECK" not in words
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert re.fullmatch(r"docker\.io/library/debian:12(-slim)?", args["DEBIAN"])        # Debian 12: Python 3.11
    assert [a for w, a in ins if w == "FROM"] == ["${DEBIAN} AS build", "${DEBIAN}"]
    run = " ".join(a for w, a in ins if w == "RUN")
    # torch 2.13.0 exactly, from the CPU wheel index
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in run
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "torch==2.13.0" in project["dependencies"]                 # pip then keeps the CPU build
    extras = re.findall(r'pip install --no-cache-dir "\.\[([a-z,]+)\]"', run)
    assert extras and set(extras[0].split(",")) <= set(project["optional-dependencies"]), extras
    # a non-root numeric user, the one the pods run as
    (user,) = [a for w, a in ins if w == "USER"]
    uid = int(user.split(":")[0])
    assert uid != 0 and uid == one("DaemonSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid}" in run
    # what it exposes is what the DaemonSet's container declares
    exposed = {int(p) for w, a in ins if w == "EXPOSE" for p in a.split()}
    assert exposed == {p["containerPort"] for p in one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    entry = json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))
    assert entry[:2] == ["/usr/bin/tini", "--"] and entry[2].endswith("/packratd")
    copied = [src for w, a in ins if w == "COPY" and not a.startswith("--from") for src in a.split()[:-1]]
    assert copied
    for src in copied:
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_the_package_the_image_installs_has_every_module(tmp_path):
    """The image runs `pip install .` (not editable) from pyproject.toml, README.md and packratd/ only:
    build that wheel here from the same files and check no module of the source tree is missing."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    shutil.copytree(os.path.join(ROOT, "packratd"), src / "packratd", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "packratd-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n for n in z.namelist() if n.endswith(".py")}
    in_tree = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "packratd", "**", "*.py"), recursive=True)}
    missing = sorted(in_tree - in_wheel)
    assert not missing, (f"not in the wheel (add their packages to [tool.setuptools] packages in pyproject.toml): "
                         f"{missing}")


def test_dockerignore_keeps_the_build_context_small():
    with open(os.path.join(DEPLOY, "Containerfile.dockerignore")) as f:
        rules = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    copied = {src.rstrip("/") for w, a in containerfile_instructions() if w == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]}
    assert {r[1:].rstrip("/") for r in rules if r.startswith("!")} == copied


def test_docs_list_every_manifest():
    with open(os.path.join(ROOT, "docs", "kubernetes.md")) as f:
        doc = f.read()
    for path in MANIFESTS + [os.path.join(DEPLOY, "Containerfile")]:
        assert os.path.relpath(path, ROOT) in doc, path
    assert "`docker build`" in doc and "has not been run" in doc
