"""The `deepvis` command line, run as a real subprocess."""
import json
import os
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


def test_version():
    from importlib.metadata import version
    r = deepvis("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"deepvis {version('deepvis-atlas')}"


def test_verbosity_flags(capsys, monkeypatch):
    """-v: the debug line; default: INFO printed as a bare line on stdout (what print did); -q: INFO
    gone, errors still one line on stderr, progress bars off (tqdm reads TQDM_DISABLE)."""
    import logging

    from deepvis.cli import main
    monkeypatch.setenv("TQDM_DISABLE", "0")            # restored (removed) after the test
    log = logging.getLogger("deepvis.test")
    assert main(["-v", "layers", "bogus"]) == 2
    out = capsys.readouterr()
    assert out.out.startswith("deepvis ") and "command layers" in out.out      # debug: stdout
    err = out.err.splitlines()
    assert len(err) == 1 and err[0].startswith("deepvis layers: error: unknown model 'bogus'")

    assert main(["layers", "bogus"]) == 2
    log.info("an info line")
    out = capsys.readouterr()
    assert out.out == "an info line\n" and len(out.err.splitlines()) == 1
    assert os.environ["TQDM_DISABLE"] == "0"

    assert main(["-q", "layers", "bogus"]) == 2
    log.info("an info line")
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and "unknown model" in out.err
    assert os.environ["TQDM_DISABLE"] == "1"
    r = deepvis("-q", "-v", "layers", "efficientnet_lite0")
    assert r.returncode == 2 and "not allowed with" in r.stderr


@pytest.mark.parametrize("flags,disabled", [([], False), (["-q"], True)])
def test_quiet_turns_progress_bars_off(flags, disabled):
    """The bars a command makes after -q is parsed (build's, optimize's: tqdm is imported lazily)
    are off; without -q they are on."""
    code = ("import os, sys; from deepvis.cli import main; assert 'tqdm' not in sys.modules; "
            f"main({flags + ['layers', 'bogus']!r}); from tqdm import tqdm; print(tqdm(range(2)).disable)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(disabled)


def test_newer_schema_is_refused(tmp_path):
    """status, query and serve read the atlas of this deepvis's schema_version, and refuse a newer one
    with one line and exit 2, leaving the atlas as it was."""
    from deepvis.storage import layout
    from devtools.viewer import make_synthetic_atlas
    root = tmp_path / "atlas"
    make_synthetic_atlas(root, big_units=4, presets=[])
    assert deepvis("status", str(root)).returncode == 0
    m = json.loads((root / "manifest.json").read_text())
    m["schema_version"] = layout.SCHEMA_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(m))
    before = (root / "manifest.json").read_bytes()
    want = (f"atlas schema_version {layout.SCHEMA_VERSION + 1} is newer than this deepvis reads "
            f"({layout.SCHEMA_VERSION}); upgrade deepvis")
    for args in (["status", str(root)], ["query", str(root), "--layer", "fc", "--unit", "0"],
                 ["serve", str(root), "--port", "0"]):
        r = deepvis(*args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and want in lines[0], (args, r.stderr)
    assert (root / "manifest.json").read_bytes() == before
    assert not (root / "viewer").exists()             # serve did not publish into it


def test_demo_without_scikit_image_or_sample(tmp_path, monkeypatch, capsys):
    """No ../shared sample and no scikit-image: one line naming the extra and --dataset, exit 2, and
    nothing written."""
    from deepvis.cli import demo, main
    monkeypatch.setattr(demo, "SHARED_SAMPLE", tmp_path / "no-sample")
    monkeypatch.setitem(sys.modules, "skimage", None)   # `import skimage` raises ImportError
    out = tmp_path / "atlas"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'deepvis-atlas[demo]'" in err[0] and "--dataset DIR" in err[0]
    assert list(tmp_path.iterdir()) == []
