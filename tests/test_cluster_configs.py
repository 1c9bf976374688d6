"""The cluster definitions in cluster/ are what a platform team applies without reading the code,
so a typo there fails at 2 a.m. on a cluster: these tests parse every file, check the fields the
Ray launcher and KubeRay need, and feed every job entrypoint (and every command in the README) to
the real CLI parser."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from promptad.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# jobs/<file>.py runs `promptad <command>` (train.py is `fit`, as DESIGN.md names the jobs).
JOB_COMMANDS = {"train": "fit", "score": "score", "audit": "audit", "recalibrate": "recalibrate"}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


def _pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    return pin.split("==")[1]


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() if p != CLUSTER / "aws.yaml" for d in _docs(p)]


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any KubeRay kind."""
    kind, spec = doc["kind"], doc["spec"]
    if kind == "RayCluster":
        return spec
    if kind == "RayJob":
        return spec["rayClusterSpec"]
    return spec["jobTemplate"]["rayClusterSpec"]


def _job_spec(doc: dict) -> dict | None:
    return {"RayJob": doc["spec"], "RayCronJob": doc["spec"].get("jobTemplate")}.get(doc["kind"])


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _job_commands(text: str) -> list[tuple[str, list[str]]]:
    """(job name, argument list) of every `python jobs/<name>.py ...` command in shell text."""
    text = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    return [(Path(m.group(1)).stem, shlex.split(m.group(2), comments=True))
            for m in re.finditer(r"python (jobs/\w+\.py)([^\n`]*)", text)]


def test_every_yaml_parses():
    files = _yaml_files()
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-score-nightly.yaml"}
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_aws_launcher_config_matches_ray_schema_and_has_an_autoscaling_gpu_group():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)

    assert config["cluster_name"] and config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["node_config"]["InstanceType"].startswith(("g", "p"))}
    assert gpu, "no GPU worker type (g*/p* instance)"
    for name, node_type in gpu.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"], name
    assert not config["docker"].get("disable_automatic_runtime_detection"), "GPU containers need the NVIDIA runtime"


@pytest.mark.parametrize("path,doc", _kuberay_docs(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_kuberay_manifest_has_required_fields(path: Path, doc: dict):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KUBERAY_KINDS, path
    assert doc["metadata"]["name"]
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == _pinned_ray_version(), "rayVersion must match the pinned ray"
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "worker groups are GPU nodes"
    job = _job_spec(doc)
    if doc["kind"] == "RayCluster":
        assert cluster["enableInTreeAutoscaling"] is True
        assert any(g["minReplicas"] < g["maxReplicas"] for g in groups), "autoscaling GPU group"
    else:
        assert job["entrypoint"].startswith("python jobs/")
        runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "file:///home/ray/promptad.zip", "the repository zip in the image"
        assert job["shutdownAfterJobFinishes"] is True
    if doc["kind"] == "RayCronJob":
        assert len(doc["spec"]["schedule"].split()) == 5


def test_every_node_runs_the_image_built_from_the_dockerfile_with_the_pinned_ray():
    images = {yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]["image"]}
    images |= {c["image"] for _, doc in _kuberay_docs() for c in _containers(_cluster_spec(doc))}
    assert len(images) == 1, f"one image everywhere, got {images}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base.startswith(f"rayproject/ray:{_pinned_ray_version()}-"), base
    # The jobs' working_dir (file:///home/ray/promptad.zip) is the repository the Dockerfile zips.
    assert re.search(r"^WORKDIR /home/ray/promptad$", dockerfile, re.M)
    assert re.search(r"^COPY .*\bjobs ", dockerfile, re.M)
    assert "cd /home/ray && python -m zipfile -c promptad.zip promptad" in dockerfile


def _documented_job_commands() -> list[tuple[str, str, list[str]]]:
    """Entrypoints of the RayJobs (parsed YAML, folded lines joined) and of the README."""
    out = [(path.relative_to(REPO).as_posix(), name, args)
           for path, doc in _kuberay_docs() if _job_spec(doc)
           for name, args in _job_commands(_job_spec(doc)["entrypoint"])]
    out += [("README.md", name, args) for name, args in _job_commands((REPO / "README.md").read_text())]
    return out


def test_every_manifest_submits_a_job():
    where = {w for w, _, _ in _documented_job_commands()}
    for path in _yaml_files():
        if path.name.startswith("rayjob"):
            assert path.relative_to(REPO).as_posix() in where


@pytest.mark.parametrize("where,name,args", _documented_job_commands(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_job_entrypoint_is_accepted_by_the_cli(where: str, name: str, args: list[str]):
    assert (REPO / "jobs" / f"{name}.py").is_file(), f"{where}: jobs/{name}.py does not exist"
    parsed = build_parser().parse_args([JOB_COMMANDS[name], *args])
    assert parsed.command == JOB_COMMANDS[name]


def _readme_promptad_commands() -> list[list[str]]:
    """Every `promptad <command> ...` line in the README's shell blocks (continuations joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and Path(words[0]).name == "promptad" and len(words) > 1:  # also .venv/bin/promptad
                commands.append(words[1:])
    return commands


def test_readme_commands_are_accepted_by_the_cli():
    commands = _readme_promptad_commands()
    assert {c[0] for c in commands} >= {"fit", "score", "audit", "demo"}
    for argv in commands:
        build_parser().parse_args(argv)
