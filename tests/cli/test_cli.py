"""The `deepvis` command line, run as a real subprocess."""
import json
import subprocess
import sys

import pytest

DEEPVIS = [sys.executable, "-m", "deepvis.cli"]


def deepvis(*args, timeout=300):
    return subprocess.run(DEEPVIS + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    r = deepvis("--help")
    assert r.returncode == 0
    for cmd in ("build", "status", "query", "optimize", "layers", "demo"):
        assert cmd in r.stdout
    r = deepvis("build", "--help")
    assert r.returncode == 0 and "--presets" in r.stdout and "--address" in r.stdout


def test_layers_json_lite0():
    r = deepvis("layers", "efficientnet_lite0", "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)
    assert set(layers[0]) == {"name", "kind", "shape", "units"}
    assert sum(l["units"] for l in layers) > 5000
    assert layers[-1] == {"name": "_fc", "kind": "linear", "shape": [1000], "units": 1000}


def test_layers_torchvision_random_offline():
    r = deepvis("layers", "torchvision:resnet18", "--weights", "none", "--json")
    assert r.returncode == 0, r.stderr
    names = [l["name"] for l in json.loads(r.stdout)]
    assert names[0] == "conv1" and names[-1] == "fc" and "layer4.1" in names


def test_layers_table():
    r = deepvis("layers", "torchvision:alexnet", "--weights", "none")
    assert r.returncode == 0 and "features.0" in r.stdout and r.stdout.strip().splitlines()[-1].endswith("units")


@pytest.mark.parametrize("args,msg", [
    (["layers", "bogus"], "unknown model 'bogus'"),
    (["layers", "efficientnet_lite0", "--layers", "nope"], "unknown layer 'nope'"),
    (["layers", "torchvision:resnet18"], "--weights none"),
])
def test_bad_input_one_line_exit_2(args, msg, tmp_path):
    import os
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    r = subprocess.run(DEEPVIS + args, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
