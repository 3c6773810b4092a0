"""infra/: the Ray cluster launcher config, the KubeRay RayCluster and RayJob, the worker image
and the Prefect cluster deployment. Nothing is built or started: each file is validated offline
by the code or schema its own tool uses, and the files are cross-checked against each other and
against the project (image name and tag, segpipe and Ray versions, one GPU per worker, scaling
from zero)."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import shlex
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER_LAUNCHER = INFRA / "ray-cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
KUBERAY_SCHEMA = INFRA / "kuberay" / "kuberay-v1.schema.json"
DOCKERFILE = INFRA / "Dockerfile"
PREFECT_CLUSTER = INFRA / "prefect-cluster.yaml"
KUBERAY_MANIFESTS = [RAYCLUSTER, RAYJOB]
# The pod templates are checked against this Kubernetes release's schema (shipped offline by
# kubernetes-validate): the oldest release the manifests are meant for.
KUBERNETES_VERSION = "1.33"
IMAGE_NAME = "ghcr.io/segpipe/segpipe-worker"
GPU_RESOURCE = "nvidia.com/gpu"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def segpipe_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def pod_templates(spec: dict) -> dict[str, dict]:
    """Every pod template of a RayCluster spec, by group ('head' or the worker group's name)."""
    return {"head": spec["headGroupSpec"]["template"]} | {
        group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}


def ray_container(template: dict) -> dict:
    # KubeRay runs Ray in the first container of each pod.
    return template["spec"]["containers"][0]


def gpus_of(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0))


def kubernetes_cpus(quantity: str) -> int:
    """A whole-CPU Kubernetes quantity ("8", or "8000m") as a count."""
    return int(quantity[:-1]) // 1000 if quantity.endswith("m") else int(quantity)


def gpu_groups(spec: dict) -> list[dict]:
    return [group for group in spec["workerGroupSpecs"] if gpus_of(ray_container(group["template"]))]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped,
    as Docker reads them."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def dockerfile_arguments(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)


# --- Ray cluster launcher ------------------------------------------------------------------------

def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(CLUSTER_LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written: no unknown keys, right types
    # What `ray up` does before it talks to the cloud: merge with the provider's defaults, merge
    # the setup commands, check the docker section, then validate against the same schema.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)

    # Everything is in the image: the AWS defaults' `pip install` setup commands must not come back.
    for commands in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[commands] == [], commands
    assert prepared["docker"]["image"] == raw["docker"]["image"]
    assert prepared["idle_timeout_minutes"] > 0

    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # no segmentation actor on the head
    workers = {name: node for name, node in node_types.items() if name != prepared["head_node_type"]}
    gpu_workers = {name: node for name, node in workers.items() if node["resources"].get("GPU")}
    assert gpu_workers, "no GPU worker type"
    for name, node in gpu_workers.items():
        assert node["resources"]["GPU"] == 1, name
        assert node["resources"].get("CPU", 0) >= 1, name
        assert node["min_workers"] == 0, name
        assert 1 <= node["max_workers"] <= prepared["max_workers"], name

    # Token authentication: on in every container, with the token copied to Ray's default path.
    assert "--env RAY_AUTH_MODE=token" in prepared["docker"]["run_options"]
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# --- KubeRay --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_kuberay_manifests_use_only_fields_of_the_kuberay_v1_api(path):
    manifest = load_yaml(path)
    definitions = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(definitions)
    schema = {"$ref": f"#/$defs/{manifest['kind']}", "$defs": definitions["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(manifest)


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_every_pod_template_is_a_valid_kubernetes_pod_template(path, monkeypatch):
    import kubernetes_validate

    def refuse(*args):
        raise AssertionError("the Kubernetes schemas must come from the package, not the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for group, template in pod_templates(cluster_spec(load_yaml(path))).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        try:
            kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name}, group {group}: {'.'.join(map(str, error.path))}: {error.message}")
        # Ray sizes a node from its container's limits; requests equal to them keep the pod from
        # being scheduled where the limits do not fit (and the API server refuses requests > limits).
        resources = ray_container(template)["resources"]
        assert resources["requests"] == resources["limits"], f"{path.name}, group {group}"


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_rays_kuberay_autoscaler_reads_the_cluster_as_intended(path):
    """Ray's autoscaler on the head derives its config from the RayCluster the way this test
    does; the result must pass Ray's schema and carry the resources and limits we meant."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    manifest = load_yaml(path)
    spec = cluster_spec(manifest)
    # The API server fills in the namespace; the RayJob's cluster gets a name derived from the job's.
    ray_cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
              "metadata": {"name": "segpipe", "namespace": "segpipe"}, "spec": spec}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    validate_config(config)

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    groups = gpu_groups(spec)
    assert groups, "no GPU worker group"
    for group in groups:
        node_type = config["available_node_types"][group["groupName"]]
        limits = ray_container(group["template"])["resources"]["limits"]
        assert node_type["resources"]["GPU"] == 1 == int(limits[GPU_RESOURCE])
        assert node_type["resources"]["CPU"] == kubernetes_cpus(limits["cpu"])
        assert node_type["min_workers"] == 0
        assert node_type["max_workers"] == group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60 > 0
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"


def test_the_nightly_rayjob_runs_segpipe_run_over_object_storage():
    from flows.cli import build_parser
    from pipelines.model_card import load_card

    job = load_yaml(RAYJOB)["spec"]
    command = shlex.split(job["entrypoint"])
    assert command[0] == "segpipe"
    try:
        args = build_parser().parse_args(command[1:])  # segpipe's own command line
    except SystemExit:
        pytest.fail(f"segpipe does not accept the RayJob's entrypoint: {job['entrypoint']}")
    assert args.command == "run"
    assert args.archive.startswith("s3://") and args.out.startswith("s3://")
    load_card(args.model)
    assert args.device == "cuda"
    gpus_at_most = sum(group["maxReplicas"] for group in gpu_groups(job["rayClusterSpec"]))
    assert args.workers is not None and 1 <= args.workers <= gpus_at_most, "actors that no GPU could ever carry"
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0


# --- the worker image -----------------------------------------------------------------------------

def test_the_worker_image_installs_segpipe_on_a_cuda_runtime_as_a_non_root_user():
    instructions = dockerfile_instructions(DOCKERFILE)
    keywords = [keyword for keyword, _ in instructions]
    arguments = dockerfile_arguments(instructions)
    [base] = [value for keyword, value in instructions if keyword == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base), base
    runs = " && ".join(value for keyword, value in instructions if keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\bpython3\.11\b", runs) and "python3.11 -m venv" in runs

    # Every path copied from the build context (the repository root) exists, and every package
    # that pyproject.toml ships is copied before `pip install .`.
    copied = []
    for keyword, value in instructions:
        if keyword == "COPY":
            *sources, _ = value.split()
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), source
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {package.rstrip("*") for package in packages} <= set(copied)
    assert "pyproject.toml" in copied
    assert re.search(r"pip install \. ", runs)
    assert '"torch==${TORCH_VERSION}"' in runs and "index-url" not in runs  # PyPI's CUDA build
    assert '"ray[default]==${RAY_VERSION}"' in runs
    assert "segpipe --help" in runs  # the console script is on PATH

    labels = " ".join(value for keyword, value in instructions if keyword == "LABEL")
    assert 'org.opencontainers.image.version="${SEGPIPE_VERSION}"' in labels
    assert "SEGPIPE_VERSION" in arguments and "RAY_VERSION" in arguments
    user = [value for keyword, value in instructions if keyword == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert keywords.index("USER") > max(index for index, keyword in enumerate(keywords) if keyword == "RUN" and
                                       "pip install" in instructions[index][1])
    # The Ray cluster launcher finds the user's home in the image's environment, not in /etc/passwd.
    assert any(keyword == "ENV" and value.startswith("HOME=/home/") for keyword, value in instructions)


# --- Prefect --------------------------------------------------------------------------------------

def test_the_cluster_deployment_file_matches_the_flow_and_the_ray_cluster():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    from flows.archive_flow import segment_archive
    from pipelines.model_card import load_card

    project = load_yaml(PREFECT_CLUSTER)
    PrefectYamlModel.model_validate(project)  # what `prefect deploy` validates the file with
    [deployment] = project["deployments"]
    file_path, attribute = deployment["entrypoint"].split(":")
    module = importlib.import_module(file_path.removesuffix(".py").replace("/", "."))
    assert getattr(module, attribute) is segment_archive
    assert deployment["flow_name"] == segment_archive.name

    parameters = deployment["parameters"]
    signature = inspect.signature(segment_archive.fn).parameters
    assert set(parameters) <= set(signature)
    segment_archive.validate_parameters(parameters)  # names, types and required ones, as a run does
    load_card(parameters["model"])
    assert parameters["archive"].startswith("s3://") and parameters["out"].startswith("s3://")
    assert parameters["options"]["device"] == "cuda"
    [schedule] = deployment["schedules"]
    RawScheduleConfig.model_validate(schedule)
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])

    # The driver joins the RayCluster through its head Service's client port, with a token.
    raycluster = load_yaml(RAYCLUSTER)
    head_ports = {port["name"]: port["containerPort"]
                  for port in ray_container(raycluster["spec"]["headGroupSpec"]["template"])["ports"]}
    env = deployment["work_pool"]["job_variables"]["env"]
    assert env["RAY_ADDRESS"] == f"ray://{raycluster['metadata']['name']}-head-svc:{head_ports['client']}"
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token is a secret: it never goes into the file"
    gpus_at_most = sum(group["maxReplicas"] for group in gpu_groups(raycluster["spec"]))
    assert 1 <= parameters["options"]["workers"] <= gpus_at_most, "actors that no GPU could ever carry"


# --- across files ---------------------------------------------------------------------------------

def test_every_infra_file_names_one_image_tagged_with_the_segpipe_version():
    version = segpipe_version()
    named = {"ray-cluster.yaml": [load_yaml(CLUSTER_LAUNCHER)["docker"]["image"]]}
    for path in KUBERAY_MANIFESTS:
        named[path.name] = [container["image"] for template in pod_templates(cluster_spec(load_yaml(path))).values()
                            for container in template["spec"]["containers"]]
    # and wherever else a file under infra/ mentions the image (README, comments, Prefect files)
    for path in sorted(INFRA.rglob("*")):
        if path.is_file():
            named.setdefault(path.name, []).extend(re.findall(rf"{re.escape(IMAGE_NAME)}:[\w.-]+", path.read_text()))
    assert all(named[name] for name in ("ray-cluster.yaml", "raycluster.yaml", "rayjob.yaml", "Dockerfile"))
    images = {image for found in named.values() for image in found}
    assert images == {f"{IMAGE_NAME}:{version}"}, named

    arguments = dockerfile_arguments(dockerfile_instructions(DOCKERFILE))
    assert arguments["SEGPIPE_VERSION"] == version


def test_ray_is_the_same_version_in_the_image_the_manifests_and_this_environment():
    arguments = dockerfile_arguments(dockerfile_instructions(DOCKERFILE))
    versions = {"installed": ray.__version__, "Dockerfile": arguments["RAY_VERSION"]}
    for path in KUBERAY_MANIFESTS:
        versions[path.name] = cluster_spec(load_yaml(path))["rayVersion"]
    assert set(versions.values()) == {ray.__version__}, versions
