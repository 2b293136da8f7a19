"""cluster/: the files parse, stay in step with the config schema, keep listeners on loopback and
hold no secrets."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain_pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
GPT2 = ROOT / "configs" / "gpt2-124m.yaml"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_cluster_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    for required in ("ray/aws.yaml", "ray/gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                     "kuberay/pvc.yaml", "slurm/pretrain.sbatch", "docker/Dockerfile", "hostfile.example",
                     "README.md"):
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


# --set values that the shell fills in ($VAR) or the user does (<placeholder>) are checked through
# the Slurm run below, or not at all.
_SET = re.compile(r"""--set\s+('[^']*'|"[^"]*"|[^\s`|]+)""")


def literal_overrides(text: str) -> list[str]:
    values = [m.group(1).strip("'\"") for m in _SET.finditer(text)]
    return [v for v in values if "$" not in v and "<" not in v]


@pytest.mark.parametrize("name", ["kuberay/rayjob.yaml", "README.md", "ray/aws.yaml", "ray/gcp.yaml"])
def test_overrides_validate_against_the_config(name):
    overrides = literal_overrides((CLUSTER / name).read_text())
    assert overrides, f"{name} has no --set"
    for item in overrides:
        load_config(GPT2, [item])  # raises ConfigError naming the field and the problem


def test_rayjob_trains_on_the_gpu_workers():
    # The config as shipped would start DeepSpeed ranks on the GPU-less head.
    job = _docs(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    cfg = load_config(GPT2, literal_overrides(job["spec"]["entrypoint"]))
    gpu = next(g for g in _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]["workerGroupSpecs"]
               if g["groupName"] == "gpu")
    assert cfg.train.launch.launcher == "ray" and cfg.train.launch.nnodes == gpu["replicas"]
    assert cfg.train.launch.nproc_per_node == int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.runtime.runs_root.startswith("/workspace/")
    readme = (CLUSTER / "README.md").read_text()
    for path in ("ray/aws.yaml", "ray/gcp.yaml"):
        header = (CLUSTER / path).read_text()
        for text in (header, readme):
            assert "--set train.launch.launcher=ray --set train.launch.nnodes=2 --set runtime.runs_root=/workspace/runs" in text


# --- pinned versions --------------------------------------------------------------------------------

def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_image_and_kuberay_versions_match_the_constraints():
    pins = constraints()
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    # Everything else the image installs is held to the same file.
    assert "-c requirements/constraints.txt" in dockerfile
    assert re.search(r"ARG TORCH_SPEC=torch==(\S+)", dockerfile).group(1) == pins["torch"]
    assert _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]["rayVersion"] == pins["ray"]
    # Any other exact pin written in a cluster file (name==version) must be the tested one.
    for path in [CLUSTER / "docker" / "Dockerfile", *YAMLS, CLUSTER / "slurm" / "pretrain.sbatch"]:
        for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([0-9][\w.+-]*)", path.read_text()):
            key = re.sub(r"[-_.]+", "-", name.lower())
            assert key in pins and pins[key] == version.split("+")[0], f"{path.name}: {name}=={version} vs constraints"


# --- image ------------------------------------------------------------------------------------------

def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: a pattern matches the path or one of its parents;
    ``**/`` matches any number of leading folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        tail = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if tail and any(fnmatch.fnmatchcase("/".join(prefix.split("/")[i:]), tail)
                            for i in range(len(prefix.split("/")))):
                return True
    return False


def test_dockerignore_keeps_state_and_secrets_out_of_the_image():
    # The Dockerfile and the docs build with the repository root as the context.
    build = re.search(r"docker build -f cluster/docker/Dockerfile(?:[^\n]*\\\n#)*[^\n]*", (CLUSTER / "docker" / "Dockerfile").read_text())
    assert build and build.group(0).endswith(" ."), "the build context should be the repository root"
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".state/prefect/db", "runs/smoke/train/summary.json", "wandb/run-1/x",
                 ".git/config", "tests/__pycache__/x.pyc", ".pytest_cache/v", ".env", "configs/.env",
                 ".env.local", ".netrc", ".deepspeed_env", "cluster/.deepspeed_env",
                 ".state/ray-token-123", "deploy/secrets/wandb"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the image"
    # ...and everything the image needs goes in: every tracked file the project is built from.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needed = [f for f in tracked if f.split("/")[0] in {"pretrain_pipeline", "data_prep", "pretrain", "flows",
                                                       "configs", "requirements", "cluster"}]
    needed += ["pyproject.toml", "README.md", "Makefile"]
    assert len(needed) > 20
    leaked = [f for f in needed if ignored(f, patterns)]
    assert not leaked, f".dockerignore drops files the image needs: {leaked}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_pretrain_in_the_image_uses_its_venv(tmp_path):
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(r"^\s*VENV=/opt/venv\b", dockerfile, re.M) and "touch /opt/venv/.installed" in dockerfile
    # What make does in the image: VENV from the environment, the stamp newer than the sources.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    # Not the outer make's settings (this test may itself run under `make test`).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "pretrain", "ARGS=--ray-address auto"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**env, "VENV": str(venv)}).stdout
    assert out.strip() == f"{venv}/bin/pretrain-pipeline run --config configs/gpt2-124m.yaml --ray-address auto"


# --- shared storage -----------------------------------------------------------------------------------

def test_every_node_mounts_shared_storage_at_workspace():
    for name, mount in (("aws.yaml", "/mnt/efs"), ("gcp.yaml", "/mnt/filestore")):
        cfg = _docs(CLUSTER / "ray" / name)[0]
        assert f"-v {mount}:/workspace" in cfg["docker"]["run_options"], name
        # Mounted on the host, before Docker starts, on every node type.
        assert any("mount -t nfs" in c and mount in c for c in cfg["initialization_commands"]), name
        assert not any(t.get("initialization_commands") == [] for t in cfg["available_node_types"].values())
    pvc = _docs(CLUSTER / "kuberay" / "pvc.yaml")[0]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]
    volumes = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v)
    assert claim == pvc["metadata"]["name"] == "pretrain-pipeline-workspace"


# --- Slurm, run against stand-ins for srun/scontrol -----------------------------------------------------

SHIM_SRUN = """#!{python}
# srun stand-in: records the call, then runs the command once per node of the step, as srun would.
import json, os, subprocess, sys
args, opts = sys.argv[1:], []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
    if opts[-1] in ("-w", "-N", "-n", "--nodelist", "--exclude"):
        opts[-1] += "=" + args.pop(0)
nodes = os.environ["SHIM_NODES"].split()
step = list(nodes)
for o in opts:
    if o.startswith(("-w=", "--nodelist=")):
        step = o.split("=", 1)[1].split(",")
    elif o.startswith("--exclude="):
        step = [n for n in step if n not in o.split("=", 1)[1].split(",")]
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "srun", "opts": opts, "cmd": args, "nodes": step}}) + "\\n")
rc = 0
for host in step:
    env = dict(os.environ, SLURM_NODEID=str(nodes.index(host)), SLURMD_NODENAME=host)
    rc = max(rc, subprocess.run(args, env=env).returncode)
sys.exit(rc)
"""
SHIM_RECORD = """#!{python}
# {tool} stand-in: records its arguments and the node it runs on.
import json, os, sys
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "{tool}", "argv": sys.argv[1:], "node": os.environ.get("SLURMD_NODENAME")}}) + "\\n")
"""
SHIM_SCONTROL = """#!/bin/sh
# scontrol stand-in: `scontrol show hostnames <list>` expands to the nodes of the test's allocation.
for n in $SHIM_NODES; do echo "$n"; done
"""
SHIM_HOSTNAME = """#!/bin/sh
# hostname stand-in: `hostname --ip-address` on node i prints 10.9.0.(i+1) and a link-local address.
echo "10.9.0.$((SLURM_NODEID + 1)) fe80::1"
"""


def run_sbatch(tmp_path: Path, launcher: str, nodes: list[str]) -> tuple[list[dict], Path]:
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in {"srun": SHIM_SRUN.format(python=sys.executable), "scontrol": SHIM_SCONTROL,
                       "hostname": SHIM_HOSTNAME,
                       "ray": SHIM_RECORD.format(python=sys.executable, tool="ray"),
                       "pretrain-pipeline": SHIM_RECORD.format(python=sys.executable, tool="pretrain-pipeline")}.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    log, state = tmp_path / "calls.jsonl", tmp_path / "state"
    env = {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "SHIM_LOG": str(log),
           "SHIM_NODES": " ".join(nodes), "SLURM_JOB_NODELIST": f"gpu-[001-00{len(nodes)}]", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "64", "PRETRAIN_PIPELINE_STATE": str(state),
           "LAUNCHER": launcher, "RAY_START_WAIT": "0"}
    subprocess.run(["bash", str(CLUSTER / "slurm" / "pretrain.sbatch"), str(GPT2)], env=env, check=True,
                   timeout=60, capture_output=True, text=True)
    return [json.loads(line) for line in log.read_text().splitlines()], state


def _flag(argv: list[str], name: str) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i in range(len(argv) - 1) if argv[i] == name)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sbatch_steps_hostfile_and_per_node_commands(tmp_path, launcher):
    nodes = ["gpu-001", "gpu-002", "gpu-003"]
    calls, state = run_sbatch(tmp_path, launcher, nodes)
    sruns = [c for c in calls if c["tool"] == "srun"]
    # Every step can run beside the Ray steps that stay up in the background.
    assert sruns and all("--overlap" in c["opts"] for c in sruns), sruns
    per_node = [c for c in sruns if c["nodes"] == nodes]
    assert all({"--nodes=3", "--ntasks=3", "--ntasks-per-node=1"} <= set(c["opts"]) for c in per_node)
    assert [c["cmd"][:2] for c in per_node] == [["ray", "stop"], ["bash", "-c"]]

    ray = [c for c in calls if c["tool"] == "ray" and c["argv"][0] == "start"]
    # Background steps: their records may come in any order.
    assert sorted((c["node"], "--head" in c["argv"]) for c in ray) == [("gpu-001", True), ("gpu-002", False), ("gpu-003", False)]
    ray.sort(key=lambda c: c["node"])
    assert all("--address=10.9.0.1:6379" in c["argv"] for c in ray[1:])
    assert all("--num-cpus=64" in c["argv"] for c in ray)

    stages = [c for c in calls if c["tool"] == "pretrain-pipeline"]
    assert [c["argv"][0] for c in stages] == ["clean", "tokenize", "train", "train", "train",
                                              "evaluate", "export", "report"]
    assert all(c["argv"][c["argv"].index("--ray-address") + 1] == "10.9.0.1:6379" for c in stages[:2])
    trains = stages[2:5]
    assert [c["node"] for c in trains] == nodes
    for rank, call in enumerate(trains):
        argv = call["argv"]
        sets = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--set"]
        cfg = load_config(GPT2, sets)  # every --set the script passes is a valid config
        assert cfg.train.launch.launcher == launcher and cfg.train.launch.node_rank == rank and cfg.train.launch.nnodes == 3
        assert cfg.train.launch.master_addr == "10.9.0.1" and cfg.train.launch.master_port == 29500
        assert cfg.train.launch.nproc_per_node == 8
        if launcher == "deepspeed":
            assert cfg.train.launch.no_ssh and Path(cfg.train.launch.hostfile) == state / "hostfile-4242"
    if launcher == "deepspeed":
        assert (state / "hostfile-4242").read_text() == "".join(f"{n} slots=8\n" for n in nodes)
    token = state / "ray-token-4242"
    assert token.stat().st_mode & 0o077 == 0 and re.fullmatch(r"[0-9a-f]{64}", token.read_text())


def test_sbatch_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm" / "pretrain.sbatch")], check=True)


def test_hostfile_example_format():
    for line in (CLUSTER / "hostfile.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"\S+ slots=\d+", line.strip())
