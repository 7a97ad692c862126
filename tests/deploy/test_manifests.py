"""deploy/ checked statically: every YAML parses, the RayJob's entrypoint is a valid `deepvis build`
command line by the CLI's own parser, the image's and the launcher's install command is the README's,
and the versions and images agree across files."""
from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def readme_install() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## On a cluster.*?```sh\n(.*?)\n```", text, re.S)
    assert block, "README has no install block under 'On a cluster'"
    lines = [l for l in block.group(1).splitlines() if l.strip()]
    assert len(lines) == 1 and "pip install" in lines[0], lines
    return lines[0].strip()


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.name for f in files} >= {"aws.yaml", "raycluster.yaml", "rayjob.yaml"}
    for f in files:
        assert docs(f), f


def test_rayjob_entrypoint_is_a_valid_build():
    from deepvis.cli import build_parser
    from deepvis.cli.build import config_from_args

    (job,) = [d for d in docs(DEPLOY / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "deepvis"
    args = build_parser().parse_args(argv[1:])          # SystemExit (a failed test) if not valid
    assert args.command == "build"
    cfg = config_from_args(args)                         # the config's own checks (unknown keys, types)
    assert cfg.out.startswith("s3://") and cfg.dataset.startswith("s3://")
    assert cfg.device == "cuda" and cfg.model == "torchvision:googlenet"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_a_bad_entrypoint_would_be_caught():
    """The check above can fail: a misspelt flag is refused by the same parser."""
    from deepvis.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("build --modle torchvision:googlenet --out s3://b/a"))


def test_dockerfile_installs_with_the_readme_line():
    text = (DEPLOY / "Dockerfile").read_text()
    runs = [l[len("RUN "):].strip() for l in text.splitlines() if l.startswith("RUN ") and "pip install" in l]
    assert runs == [readme_install()]
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    for pkg in ("deepvis", "tasks", "storage", "cluster", "atlas_viewer"):
        assert re.search(rf"^COPY .*\b{pkg} {pkg}$", text, re.M), pkg
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_versions_and_images_agree():
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    images = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for d in docs(DEPLOY / "kuberay" / name):
            if d["kind"] not in ("RayCluster", "RayJob"):
                continue
            spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
            assert spec["rayVersion"] == ray_version, name
            assert spec["authOptions"]["mode"] == "token"
            groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
            for g in groups:
                for c in g["template"]["spec"]["containers"]:
                    images.add(c["image"])
            gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert gpu["nvidia.com/gpu"] == "1"
    aws = docs(DEPLOY / "aws.yaml")[0]
    images.add(aws["docker"]["image"])
    assert len(images) == 1 and images.pop().endswith("/deepvis-atlas:latest")


def test_aws_launcher():
    aws = docs(DEPLOY / "aws.yaml")[0]
    assert aws["provider"]["type"] == "aws"
    assert any(readme_install() in c for c in aws["setup_commands"])
    types = aws["available_node_types"]
    for name, t in types.items():   # S3 by instance role, never keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == aws["max_workers"] > 0   # autoscaling
    assert gpu["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head        # reached through `ray dashboard` (ssh tunnel)
    text = (DEPLOY / "aws.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_readme_command_lines_parse():
    """Every `deepvis ...` line in README's code blocks is valid for the CLI's parser (submit's
    command after `--` included)."""
    from deepvis.cli import build_parser
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines, checked = [], 0
    for b in blocks:
        joined = b.replace("\\\n", " ")
        lines += [l.split("  #")[0].strip() for l in joined.splitlines() if l.strip().startswith("deepvis ")]
    for line in lines:
        argv = shlex.split(line.replace("...", "").replace("…", ""))[1:]
        if "--" in argv and argv[0] == "submit":
            i = argv.index("--")
            rest = argv[i + 1:]
            if len(rest) > 1:
                build_parser().parse_args(rest)
                checked += 1
            argv = argv[:i]
        build_parser().parse_args(argv)
        checked += 1
    assert checked >= 15, checked


def test_dockerfile_copies_what_the_wheel_is_built_from():
    """Every source folder of pyproject's package-dir, the readme and the license files are COPY'd
    before `pip install .` (the wheel build fails without them)."""
    import tomllib
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = set(py["tool"]["setuptools"]["package-dir"].values())
    files = {py["project"]["readme"], *py["project"]["license-files"], "pyproject.toml"}
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY "):
            srcs = [a for a in shlex.split(line)[1:-1] if not a.startswith("--")]
            copied.update(srcs)
    assert dirs <= copied, dirs - copied
    assert files <= copied, files - copied
    for f in files:
        assert (ROOT / f).is_file(), f


def test_dockerfile_states_the_driver_its_cuda_wheels_need():
    """torch's default Linux wheel bundles a CUDA build; the image must say which NVIDIA driver that
    build needs (CUDA 13.x: R580 or newer) and name the same CUDA as the torch it installs."""
    import torch
    text = (DEPLOY / "Dockerfile").read_text()
    pinned = re.search(r"pip install torch==(\S+)", text).group(1)
    assert torch.__version__.split("+")[0] == pinned                    # the torch this suite runs
    cuda = torch.version.cuda or re.search(r"\+cu(\d+)(\d)$", torch.__version__ + "+cu130").expand(r"\1.\2")
    m = re.search(r"CUDA (\d+\.\d+) build.*?driver >= (\d+)\.(\d+)\.(\d+)", text, re.S)
    assert m, "the Dockerfile does not state the CUDA build and the driver it needs"
    assert m.group(1) == cuda
    minimum = {"12": 525, "13": 580}[cuda.split(".")[0]]                # per CUDA major (minor compatibility)
    assert int(m.group(2)) >= minimum


def test_aws_launcher_syncs_no_venv_atlases_or_caches():
    """The launcher config validates against Ray's own schema, and the rsync arguments Ray builds from
    it (its own function) exclude the venv, atlases, artifacts and caches."""
    import json
    from pathlib import Path

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.command_runner import SSHCommandRunner
    aws = docs(DEPLOY / "aws.yaml")[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)     # what `ray up` checks (validate_config, before filling defaults)
    args = SSHCommandRunner._create_rsync_filter_args(None, aws)
    excluded = {args[i + 1] for i, a in enumerate(args) if a == "--exclude"}
    assert {"/.venv", "/atlas", "/artifacts", "**/__pycache__", ".pytest_cache", "**/.git"} <= excluded
    assert ["--filter", "dir-merge,- .gitignore"] == args[-2:]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "atlas/", "artifacts/", "__pycache__/"} <= set(ignored)


def test_bench_imports_no_test_code():
    """bench/ uses devtools/, never tests/ (a benchmark must run from a checkout without the suite)."""
    import ast
    bad = []
    for f in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert bad == []
    assert (ROOT / "devtools" / "s3server.py").is_file() and (ROOT / "devtools" / "viewer.py").is_file()


def test_nothing_refers_outside_the_repository():
    """The atlas format is FORMAT.md, inside the repository: no file names the old contract."""
    skip = {".git", ".venv", "atlas", "artifacts", "__pycache__", ".pytest_cache"}
    old = "DESIGN" + ".md"          # split: this file must not match itself
    hits = []
    for f in ROOT.rglob("*"):
        parts = f.relative_to(ROOT).parts
        if any(p.endswith(".egg-info") for p in parts):    # pip's build metadata (ignored by git)
            continue
        if f.is_file() and not skip & set(parts) and f.suffix in (
                ".py", ".md", ".toml", ".yaml", ".sh", ".js", ".html", ".css", ".txt", "") :
            text = f.read_text(errors="replace")
            if old in text or "shared/" + "DESIGN" in text:
                hits.append(str(f.relative_to(ROOT)))
    assert hits == []
    assert (ROOT / "FORMAT.md").is_file()
