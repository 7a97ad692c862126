"""`deepvis compare` (numbers against numpy over the same Parquet rows) and `deepvis tune` (its
presets file loads and reproduces the printed scores' ranking)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deepvis.storage import layout
from deepvis.storage.store import LocalStore


def _atlas(root, presets=("yosinski-3", "maco"), quality=True):
    store = LocalStore(root)
    rng = np.random.default_rng(0)
    rows = []
    for layer, n in (("conv.1", 6), ("fc", 4)):
        for u in range(n):
            r = {"layer": layer, "unit": u, "mean": 0.0, "std": 1.0, "max": 5.0, "frac_positive": 0.5, "count": 10}
            for p in presets:
                r[f"opt_{p}"] = float(rng.uniform(1, 9))
                r[f"dead_{p}"] = bool(u == 3 and p == presets[0])
                if quality:
                    r[f"act_{p}"] = r[f"opt_{p}"]
                    r[f"ratio_{p}"] = r[f"opt_{p}"] / 5.0
                    r[f"hf_{p}"] = float(rng.uniform(0.5, 20))
                    r[f"robust_{p}"] = float("nan") if u == 0 else float(rng.uniform(0, 1))
            rows.append(r)
    store.put(layout.UNITS, layout.table_bytes(layout.units_table(rows, list(presets))))
    layout.put_json(store, layout.MANIFEST, {"schema_version": 1, "status": "complete",
                                             "model": {"name": "m"}, "presets": [{"name": p} for p in presets],
                                             "layers": [{"name": "conv.1", "units": 6}, {"name": "fc", "units": 4}]})
    return rows


def test_compare_numbers(tmp_path, capsys):
    from deepvis.cli import main
    rows = _atlas(tmp_path / "a")
    assert main(["compare", str(tmp_path / "a"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [(t["preset"], t["layer"]) for t in table] == [
        ("yosinski-3", None), ("yosinski-3", "conv.1"), ("yosinski-3", "fc"),
        ("maco", None), ("maco", "conv.1"), ("maco", "fc")]
    for t in table:
        rs = [r for r in rows if t["layer"] in (None, r["layer"])]
        p = t["preset"]
        assert t["units"] == len(rs)
        assert t["ratio"] == pytest.approx(float(np.median([r[f"ratio_{p}"] for r in rs])), rel=1e-6)
        assert t["hf"] == pytest.approx(float(np.median([r[f"hf_{p}"] for r in rs])), rel=1e-6)
        assert t["robust"] == pytest.approx(float(np.nanmean([r[f"robust_{p}"] for r in rs])), rel=1e-6)
        assert t["dead"] == sum(r[f"dead_{p}"] for r in rs)
    assert main(["compare", str(tmp_path / "a"), "--layer", "fc"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith(("yosinski-3", "maco"))]
    assert len(lines) == 2 and all("(all layers)" in l for l in lines)
    want = float(np.median([r["ratio_maco"] for r in rows if r["layer"] == "fc"]))
    assert f"{want:.2f}" in lines[1].split()


def _err(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("deepvis compare: error: ")
    return err


def test_compare_errors(tmp_path, capsys):
    from deepvis.cli import main
    assert "no atlas" in _err(main, ["compare", str(tmp_path / "none")], capsys)
    _atlas(tmp_path / "a")
    assert "'nope' is not in this atlas" in _err(main, ["compare", str(tmp_path / "a"), "--layer", "nope"], capsys)
    _atlas(tmp_path / "old", quality=False)
    assert "no quality measures" in _err(main, ["compare", str(tmp_path / "old")], capsys)
    _atlas(tmp_path / "none-presets", presets=())
    assert "no optimized images" in _err(main, ["compare", str(tmp_path / "none-presets")], capsys)


def test_tune_writes_loadable_presets(tmp_path, capsys, sample_dir):
    from deepvis.cli import main
    from deepvis.tasks.optimize import load_presets
    ds = tmp_path / "ds"
    ds.mkdir()
    import shutil
    for f in sorted(sample_dir.glob("*/*.JPEG"))[:12]:
        shutil.copy(f, ds / f.name)
    out = tmp_path / "tuned.toml"
    assert main(["tune", "--model", "efficientnet_lite0", "--layer", "_fc", "--units", "0,1", "--trials", "6",
                 "--steps", "8", "--size", "32", "--dataset", str(ds), "--top", "3", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in res] == ["tuned-1", "tuned-2", "tuned-3"]
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    got = load_presets(out)
    assert list(got) == ["tuned-1", "tuned-2", "tuned-3"]
    for r in res:
        p = got[r["name"]]
        for k in ("decay", "blur_width", "blur_every", "norm_pct", "contrib_pct", "steps", "lr", "lr_policy"):
            assert getattr(p, k) == r["preset"][k], k
        for m in r["units"]:
            assert math.isfinite(m["act"]) and m["hf"] > 0
    # the reference: each unit's max logit over the 12 images (brute force)
    import torch

    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import preprocess
    from PIL import Image
    lm = load_model("efficientnet_lite0")
    with torch.no_grad():
        logits = lm.module(torch.stack([preprocess(Image.open(f), lm.preprocessing) for f in sorted(ds.iterdir())]))
    for m in res[0]["units"]:
        assert m["ratio"] == pytest.approx(m["act"] / float(logits[:, m["unit"]].max()), rel=1e-4)
    # errors are one line
    assert main(["tune", "--model", "efficientnet_lite0", "--layer", "nope"]) == 2
    assert "unknown layer 'nope'" in capsys.readouterr().err
    assert main(["tune", "--model", "efficientnet_lite0", "--layer", "_fc", "--trials", "0"]) == 2
    assert "--trials" in capsys.readouterr().err
