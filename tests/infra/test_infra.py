"""The container, cluster and deployment files of infra/: every YAML loads, and the parts the rebuild
flow depends on (entrypoints, GPU resources, image tags, credentials, config keys) hold."""

from __future__ import annotations

import copy
import glob
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from salient import cli, config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFRA = os.path.join(ROOT, "infra")
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
VERSION = importlib.metadata.version("salient")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|AWS_ACCESS_KEY_ID", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
# The job variables of the Kubernetes worker's default base job template (prefect-kubernetes 0.8.0,
# KubernetesWorkerVariables plus Prefect's BaseVariables): a deployment may only set these.
KUBERNETES_JOB_VARIABLES = {
    "name", "env", "labels", "command", "annotations", "namespace", "image", "service_account_name",
    "image_pull_policy", "backoff_limit", "finished_job_ttl", "job_watch_timeout_seconds",
    "pod_watch_timeout_seconds", "stream_output", "cluster_config", "cpu_request", "cpu_limit",
    "memory_request", "memory_limit",
}


def _pins() -> dict[str, str]:
    pins = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


def _yaml_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(INFRA, "**", "*.yaml"), recursive=True))


def _docs(path: str) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _doc(name: str, kind: str | None = None) -> dict:
    docs = _docs(os.path.join(INFRA, name))
    if kind is not None:
        docs = [d for d in docs if d.get("kind") == kind]
    (doc,) = docs
    return doc


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every mapping inside ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _dockerfile() -> str:
    with open(os.path.join(INFRA, "Dockerfile")) as fh:
        return fh.read()


def _cluster_specs() -> list[tuple[str, dict]]:
    """The RayCluster specs: the long-lived cluster's and the one the RayJob creates."""
    return [
        ("kuberay/raycluster.yaml", _doc("kuberay/raycluster.yaml", "RayCluster")["spec"]),
        ("kuberay/rayjob.yaml", _doc("kuberay/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]),
    ]


def _service_account() -> dict:
    return _doc("kuberay/serviceaccount.yaml", "ServiceAccount")


def test_every_yaml_loads():
    paths = _yaml_paths()
    assert {os.path.relpath(p, INFRA) for p in paths} >= {
        "kuberay/serviceaccount.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "aws/cluster.yaml",
        "prefect-kubernetes.yaml",
    }
    for path in paths:
        assert _docs(path), f"{path} is empty"


def test_image_tags_are_the_package_version():
    assert VERSION == PYPROJECT["project"]["version"]
    images = []
    for path in _yaml_paths():
        for doc in _docs(path):
            images += [(path, v) for k, v in _walk(doc) if k == "image" and isinstance(v, str)]
    # 2 pods in each RayCluster spec, the launcher's docker image, the Prefect job's image
    assert len(images) == 6
    for path, image in images:
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("/salient") and tag == VERSION, f"{path}: image {image!r} is not salient:{VERSION}"
    assert f"salient:{VERSION}" in _dockerfile()  # the build command in its header


def test_dockerfile_installs_the_pinned_stack_on_cuda_as_a_non_root_user():
    text = _dockerfile()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu[\d.]+$", text, re.MULTILINE)
    assert base, "the base image must be a CUDA runtime image"
    index = re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu(\d+)$", text, re.MULTILINE)
    assert index and index.group(1) == base.group(1) + base.group(2), "the torch wheels' CUDA must be the base image's"
    pins = _pins()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pins['torch'])}$", text, re.MULTILINE)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(pins['torchvision'])}$", text, re.MULTILINE)
    assert "python3.11 -m venv" in text and "3.11" in PYPROJECT["project"]["requires-python"].replace("<3.12", "")
    assert re.search(r"^RUN pip install \. ", text, re.MULTILINE), "the project is installed with its own pins"
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", text, re.MULTILINE), f"the image lacks the {name} package"
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert json.loads(entrypoint)[-1] == "salient" and "salient" in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("name, spec", _cluster_specs())
def test_kuberay_cluster_has_an_autoscaling_one_gpu_worker_group(name, spec):
    assert spec["rayVersion"] == _pins()["ray"], f"{name}: rayVersion must be the Ray installed in the image"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no GPU work on the head"
    (head_container,) = head["template"]["spec"]["containers"]
    assert 10001 in [p["containerPort"] for p in head_container["ports"]], "Ray Client port"
    (group,) = spec["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"], "autoscaling needs room above the minimum"
    # The GPUs a rebuild gets: what its config asks the autoscaler for, within the group's bounds.
    wanted = _cluster_config(name).compute.request_gpus
    assert wanted is not None and 1 <= wanted <= group["maxReplicas"]
    if name == "kuberay/rayjob.yaml":
        assert group["minReplicas"] == wanted, "a cluster made for one rebuild starts with its GPUs"
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    for template in (head["template"], group["template"]):
        assert template["spec"]["serviceAccountName"] == _service_account()["metadata"]["name"]
        for container in template["spec"]["containers"]:
            assert all(src["secretRef"].get("optional") is True for src in container.get("envFrom", []))


def test_object_store_identity_is_workload_identity():
    sa = _service_account()
    assert re.fullmatch(r"arn:aws:iam::[^:]+:role/.+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    launcher = _doc("aws/cluster.yaml")
    for node_type in launcher["available_node_types"].values():
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/.+", node_type["node_config"]["IamInstanceProfile"]["Arn"])


def _rayjob_config() -> config.Config:
    """The config the RayJob's entrypoint runs: a file of a mounted ConfigMap made from the
    repository's config by the command in the file's header."""
    job = _doc("kuberay/rayjob.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "salient" and PYPROJECT["project"]["scripts"]["salient"] == "salient.cli:main"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_run
    # the config path is a file of a mounted ConfigMap
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if args.config.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    key = {item["path"]: item["key"] for item in volume["configMap"]["items"]}[os.path.relpath(args.config, mount["mountPath"])]
    # made from the repository's config by the command in the file's header
    with open(os.path.join(INFRA, "kuberay", "rayjob.yaml")) as fh:
        match = re.search(rf"create configmap {volume['configMap']['name']} --from-file={key}=(\S+)", fh.read())
    assert match
    return config.load(os.path.join(ROOT, match.group(1)), args.overrides)


def _deployment():
    from prefect.cli.deploy._models import PrefectYamlModel

    with open(os.path.join(INFRA, "prefect-kubernetes.yaml")) as fh:
        return PrefectYamlModel.model_validate(yaml.safe_load(fh))


def _cluster_config(name: str) -> config.Config:
    """The config a rebuild on the cluster of ``name`` runs with: the RayJob's own, or the Prefect
    deployment's for the long-lived RayCluster."""
    if name == "kuberay/rayjob.yaml":
        return _rayjob_config()
    (deployment,) = _deployment().deployments
    return config.load(os.path.join(ROOT, deployment.parameters["config_uri"]), deployment.parameters["overrides"])


def test_rayjob_runs_the_rebuild_on_the_mounted_config():
    cfg = _rayjob_config()
    assert cfg.compute.ray_address == "auto", "the driver runs on the head: it joins that cluster"
    assert cfg.compute.gpus_per_worker == 1 and cfg.dataset and cfg.model and cfg.output


def test_prefect_deployment_starts_the_flow_against_the_kuberay_cluster():
    from prefect import Flow

    spec = _deployment()
    cluster = _doc("kuberay/raycluster.yaml", "RayCluster")["metadata"]
    workdir = re.findall(r"^WORKDIR (\S+)$", _dockerfile(), re.MULTILINE)[-1]
    (pull,) = spec.pull
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    (deployment,) = spec.deployments
    module, func = deployment.entrypoint.split(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
    assert isinstance(flow, Flow) and flow.name == "salient-rebuild-from-file"
    inspect.signature(flow.fn).bind(**deployment.parameters)
    cfg = _cluster_config("kuberay/raycluster.yaml")
    assert cfg.compute.ray_address == f"ray://{cluster['name']}-head-svc.{cluster['namespace']}.svc.cluster.local:10001"
    pool = deployment.work_pool
    assert pool.name and set(pool.job_variables) <= KUBERNETES_JOB_VARIABLES
    assert pool.job_variables["namespace"] == cluster["namespace"] == _service_account()["metadata"]["namespace"]
    assert pool.job_variables["service_account_name"] == _service_account()["metadata"]["name"]
    assert deployment.concurrency_limit == 1


def test_cluster_launcher_config_is_valid_for_ray_with_spot_one_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = _doc("aws/cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(launcher)))  # Ray's own schema and checks
    assert launcher["provider"]["type"] == "aws"
    gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types
    for node_type in gpu_types:
        assert node_type["resources"]["GPU"] == 1
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"]
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "a reclaimed head would end the build"
    # the image's entrypoint is the CLI; the launcher runs `docker run ... IMAGE bash`
    if re.search(r"^ENTRYPOINT ", _dockerfile(), re.MULTILINE):
        assert '--entrypoint=""' in launcher["docker"]["run_options"]
    # no setup step installs anything: the image is complete (Ray's defaults would pip install)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert launcher[key] == []
    assert any("--autoscaling-config" in c for c in launcher["head_start_ray_commands"])


def test_no_inline_credentials():
    texts = {p: open(p).read() for p in [*_yaml_paths(), os.path.join(INFRA, "Dockerfile"), os.path.join(ROOT, "prefect.yaml")]}
    for path, text in texts.items():
        assert not AWS_KEY_ID.search(text), f"{path} holds an access key id"
        assert not re.findall(r"^(?:ENV|ARG)\s+\S*(?:SECRET|PASSWORD|TOKEN)", text, re.MULTILINE), path
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path}: a Secret belongs in the cluster, not here"
            for key, value in _walk(doc):
                if key == "env" and isinstance(value, list):
                    for var in value:
                        assert not (SECRET_NAME.search(var["name"]) and "value" in var), f"{path}: {var['name']} inline"
                elif key == "env" and isinstance(value, dict):
                    assert not [k for k in value if SECRET_NAME.search(k)], f"{path}: credentials in env"
