"""cluster/: the files parse, stay in step with the config schema, keep listeners on loopback and
hold no secrets."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pretrain_pipeline.config import PipelineConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_cluster_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    for required in ("ray/aws.yaml", "ray/gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                     "slurm/pretrain.sbatch", "docker/Dockerfile", "hostfile.example", "README.md"):
        assert required in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses(path):
    assert _docs(path)


def test_ray_dashboards_bind_loopback():
    for path in (CLUSTER / "ray").glob("*.yaml"):
        cfg = _docs(path)[0]
        head = " ".join(cfg["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head, path
        assert {"head", "cpu_worker", "gpu_worker"} <= set(cfg["available_node_types"]), path
    head = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "127.0.0.1"
    sbatch = (CLUSTER / "slurm" / "pretrain.sbatch").read_text()
    assert "--dashboard-host=127.0.0.1" in sbatch


def test_one_image_everywhere():
    images = set()
    for path in YAMLS:
        images |= set(re.findall(r"image:\s*\"?([^\s\"]+pretrain-pipeline[^\s\"]*)", path.read_text()))
    assert len(images) == 1, images


def test_kuberay_reads_wandb_key_from_a_secret():
    text = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert "secretKeyRef" in text
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*['\"]?[0-9a-f]{20,}", text)


def _set_keys(text: str) -> set[str]:
    return set(re.findall(r"--set\s+'?([a-z_]+\.[a-z_]+)=", text))


@pytest.mark.parametrize("name", ["slurm/pretrain.sbatch", "kuberay/rayjob.yaml"])
def test_overrides_name_real_config_fields(name):
    keys = _set_keys((CLUSTER / name).read_text())
    assert keys
    for key in keys:
        section, field = key.split(".")
        model = PipelineConfig.model_fields[section].annotation
        assert field in model.model_fields, f"{name} sets {key}, which the config does not have"


def test_sbatch_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm" / "pretrain.sbatch")], check=True)


def test_hostfile_example_format():
    for line in (CLUSTER / "hostfile.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"\S+ slots=\d+", line.strip())
