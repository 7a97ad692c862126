"""Untrusted atlases and bad input (issue #17 items 3 and 8): each case drives the real command and
asserts the exact one-line refusal, exit code 2, no traceback, and that nothing outside the atlas was
read or written (no model code imported, no directory created)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEEPVIS = [sys.executable, "-m", "deepvis.cli"]


def deepvis(*args, env: dict | None = None, timeout=240, **kw):
    return subprocess.run(DEEPVIS + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def refused(r, command: str) -> str:
    """The one error line of a refused command (exit 2, one line, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    prefix = f"deepvis {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


# ------------------------------------------------------------------ an atlas never chooses code to run
def hostile_atlas(root: Path, model: dict) -> Path:
    """A downloaded atlas whose manifest names the model to run (just enough for `query --image`)."""
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "status": "complete", "model": model,
        "layers": [{"name": "_fc", "kind": "linear", "shape": [1000], "units": 1000, "selected": [0, 1]}],
        "presets": []}))
    return root


@pytest.fixture
def evil_module(tmp_path) -> tuple[dict, Path]:
    """An importable module that, when imported, leaves a marker file: proof that code ran."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "IMPORTED"
    (code / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef build():\n    raise SystemExit(7)\n")
    return {"PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, marker


def test_query_image_refuses_the_manifests_python_model(tmp_path, evil_module, sample_dir):
    env, marker = evil_module
    atlas = hostile_atlas(tmp_path / "atlas", {"name": "evilmod:build", "weights": "default"})
    image = next(sample_dir.glob("*/*.JPEG"))
    r = deepvis("query", atlas, "--image", image, env=env)
    assert refused(r, "query") == (
        "the atlas names the model 'evilmod:build', which is not a built-in model; an atlas never chooses "
        "code to run: pass --model SPEC yourself if you trust that model")
    assert not marker.exists(), "the atlas's model module was imported"


def test_query_image_refuses_the_manifests_checkpoint_path(tmp_path, sample_dir):
    ckpt = tmp_path / "elsewhere.pt"
    ckpt.write_bytes(b"not read")
    atlas = hostile_atlas(tmp_path / "atlas", {"name": "efficientnet_lite0", "weights": str(ckpt)})
    r = deepvis("query", atlas, "--image", next(sample_dir.glob("*/*.JPEG")))
    assert refused(r, "query") == (
        f"the atlas was built with the checkpoint {str(ckpt)!r}, a file outside the atlas; pass --weights "
        f"PATH yourself to use it")


def test_trusted_model_spec_rule():
    from deepvis.tasks.errors import UserError
    from deepvis.tasks.models import trusted_model_spec, trusted_weights

    assert trusted_model_spec("efficientnet_lite0", None) == "efficientnet_lite0"
    assert trusted_model_spec("torchvision:resnet18", None) == "torchvision:resnet18"
    assert trusted_model_spec("pkg.mod:fn", "pkg.mod:fn") == "pkg.mod:fn"   # the user's own choice
    for bad in ("pkg.mod:fn", "torchvision:../x", "os:system", None, 7, "torchvision:a.b:c"):
        with pytest.raises(UserError, match="pass --model SPEC"):
            trusted_model_spec(bad, None)
    assert trusted_weights("default", None) is None and trusted_weights("none", None) == "none"
    with pytest.raises(UserError, match="pass --weights PATH"):
        trusted_weights("/etc/passwd", None)


# ------------------------------------------------------------------ model specs that are not models
@pytest.mark.parametrize("spec,msg", [
    (":x", "model spec ':x' is not 'package.module:callable' (a dotted module name, a colon, a function "
           "name); or use efficientnet_lite0 or torchvision:<name>"),
    ("json:loads", "model 'json:loads' failed when called with no arguments (TypeError: loads() missing 1 "
                   "required positional argument: 's'); it must build and return a torch.nn.Module"),
    ("json:__version__", "model 'json:__version__' names a str, not a callable returning a torch.nn.Module"),
])
def test_layers_bad_model_spec(spec, msg):
    assert refused(deepvis("layers", spec), "layers") == msg


# ------------------------------------------------------------------ read-only commands create nothing
@pytest.mark.parametrize("command,extra", [("status", []), ("query", ["--layer", "_fc", "--unit", "0"]),
                                           ("serve", ["--port", "0"])])
def test_read_only_commands_on_a_missing_store_create_nothing(command, extra, tmp_path):
    missing = tmp_path / "no" / "such" / "atlas"
    r = deepvis(command, missing, *extra, timeout=60)
    assert refused(r, command) == (f"no atlas at {str(missing)!r} (no such directory); check the path, or build "
                                   f"one with `deepvis build --out ...`")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ build input, refused before any work
def test_build_units_past_the_layer_says_what_exists(tmp_path):
    out = tmp_path / "atlas"
    r = deepvis("build", "--layers", "_blocks.1", "--units", "0:999999", "--out", out, "--no-progress",
                "--address", "127.0.0.1:1")   # a Ray connection attempt would fail differently
    assert refused(r, "build") == "--units '0:999999' is beyond layer '_blocks.1', which has 24 units (0..23)"
    assert not (out / "manifest.json").exists()


def test_build_units_range_is_cut_to_each_smaller_layer():
    """--units 0:64 over layers of 24 and 1000 units: the README's use, still fine (checked against the
    widest layer; each layer takes the part it has)."""
    from deepvis.cluster.build import make_plan
    from deepvis.cluster.config import BuildConfig

    plan = make_plan(BuildConfig(layers="_blocks.1,_fc", units="0:64", presets="none", out="unused"))
    assert [len(l["selected"]) for l in plan.layers] == [24, 64]


def test_build_preset_name_with_dotdot_refused_at_plan_time(tmp_path):
    presets = tmp_path / "p.toml"
    presets.write_text('["../../escape"]\nbase = "yosinski-3"\n')
    out = tmp_path / "atlas"
    r = deepvis("build", "--layers", "_fc", "--units", "0:2", "--presets-file", presets, "--presets", "all",
                "--out", out, "--no-progress", "--address", "127.0.0.1:1")
    assert refused(r, "build") == (f"preset name '../../escape' in {str(presets)!r} is not allowed; use letters, "
                                   f"digits, '-', '_' and '.' (no '/' or '..'), at most 64 characters")
    assert not (out / "manifest.json").exists() and not (tmp_path / "escape.png").exists()


def test_build_out_not_writable_refused_before_ray(tmp_path):
    """Tests run as root, who may write anywhere: the build runs as `nobody` (setpriv) on a directory
    it may not write. The unreachable --address proves the check comes before any Ray connection."""
    import shutil
    import tempfile
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    top = Path(tempfile.mkdtemp(prefix="deepvis-ro-"))   # /tmp/pytest-of-root is 0700: not for nobody
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *DEEPVIS, "build", "--layers",
               "_fc", "--units", "0:2", "--out", str(ro), "--no-progress", "--address", "127.0.0.1:1"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HOME": str(top), "PYTHONDONTWRITEBYTECODE": "1"})
        assert refused(r, "build") == (f"cannot write to the store {str(ro)!r} (Permission denied: _build); "
                                       f"choose a directory you can write, or fix its permissions")
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(top)


def test_build_out_with_a_file_in_the_way(tmp_path):
    """The same refusal for root: the atlas's _build folder is a regular file."""
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "_build").write_text("in the way")
    r = deepvis("build", "--layers", "_fc", "--units", "0:2", "--out", out, "--no-progress",
                "--address", "127.0.0.1:1")
    msg = refused(r, "build")
    assert msg.startswith(f"cannot write to the store {str(out)!r} (") and "choose a directory you can write" in msg
    assert sorted(p.name for p in out.iterdir()) == ["_build"] and (out / "_build").read_text() == "in the way"


def test_optimize_out_is_a_file_refused_before_compute(tmp_path):
    """The layer is unknown too: had the compute (which resolves the layer) come first, that would be
    the error."""
    f = tmp_path / "result"
    f.write_text("keep me")
    r = deepvis("optimize", "--model", "efficientnet_lite0", "--layer", "no_such_layer", "--unit", "0",
                "--steps", "2", "--size", "32", "--device", "cpu", "--out", f)
    assert refused(r, "optimize") == (f"--out {str(f)!r} is an existing file, not a directory; pass a "
                                      f"directory (it is created)")
    assert f.read_text() == "keep me"


# ------------------------------------------------------------------ --config
@pytest.mark.parametrize("text,msg", [
    ('[build]\nlayers = "_fc"\n[bild]\nsteps = 3\n',
     "config file {p!r} has bild outside its [build] table, and they would be ignored; move every key into [build]"),
    ('layers = "_fc"\n[build]\nsteps = 3\n',
     "config file {p!r} has layers outside its [build] table, and they would be ignored; move every key into [build]"),
    ('[build]\nprogress = "no"\n', "progress must be true or false, got 'no'"),
    ('[build]\nforce = 1\n', "force must be true or false, got 1"),
])
def test_build_config_tables_and_booleans(text, msg, tmp_path):
    p = tmp_path / "b.toml"
    p.write_text(text)
    r = deepvis("build", "--config", p, "--out", tmp_path / "atlas", "--address", "127.0.0.1:1")
    assert refused(r, "build") == msg.format(p=str(p))
    assert not (tmp_path / "atlas").exists()


# ------------------------------------------------------------------ --dataset
def test_build_list_of_paths_from_the_wrong_directory_refused_at_plan_time(tmp_path, sample_dir):
    """Entries written relative to the shell's directory, not the list's: refused before any actor
    starts, not a 'complete' atlas with every image 'skipped as unreadable'."""
    files = sorted(sample_dir.glob("*/*.JPEG"))[:20]
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lst.write_text("".join(f"{os.path.relpath(f, tmp_path)}\n" for f in files))
    r = deepvis("build", "--model", "efficientnet_lite0", "--layers", "_fc", "--units", "0:2", "--presets",
                "none", "--dataset", lst, "--out", tmp_path / "atlas", "--address", "127.0.0.1:1")
    msg = refused(r, "build")
    assert msg.startswith(f"none of the first 16 entries of dataset list {str(lst)!r} exists"), msg
    assert "relative to the list file's directory" in msg
    lst.write_text("".join(f"{f}\n" for f in files))    # the same files, absolute: planned, on to Ray
    r = deepvis("build", "--model", "efficientnet_lite0", "--layers", "_fc", "--units", "0:2", "--presets",
                "none", "--dataset", lst, "--out", tmp_path / "atlas", "--address", "127.0.0.1:1")
    assert refused(r, "build").startswith("cannot reach the Ray cluster at '127.0.0.1:1'")


def test_skip_reasons_are_grouped_counted_and_capped():
    """The build's summary lines for skipped images: by reason, most common first, one example each,
    the rest counted; names printed with repr (a file name may hold control characters)."""
    from deepvis.cli.build import _skip_reasons
    skipped = ([{"image": f"m{i}.jpg", "reason": "file not found"} for i in range(4)]
               + [{"image": "e\x1b[2J.jpg", "reason": "empty file"}]
               + [{"image": f"r{i}.jpg", "reason": f"r{i}: detail"} for i in range(6)])
    assert _skip_reasons(skipped, most=3) == [
        "4 file not found, e.g. 'm0.jpg'", "1 empty file, e.g. 'e\\x1b[2J.jpg'", "1 r0, e.g. 'r0.jpg'",
        "5 more for other reasons", "every image and its reason: manifest.json, dataset.skipped"]
    assert _skip_reasons([]) == []
