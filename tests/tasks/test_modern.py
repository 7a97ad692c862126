"""tasks.modern (lucid, maco, diversity) and tasks.quality.measure / tasks.tune on the offline model."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from deepvis.tasks.modern import MODERN_PRESETS, gram_similarity, optimize_modern
from deepvis.tasks.optimize import PRESETS, all_presets, get_preset, optimize_units
from deepvis.tasks.quality import measure
from tests.tasks.test_optimize import CLASSES, DATASET, _dataset_logits

LUCID, MACO = MODERN_PRESETS["lucid"], MODERN_PRESETS["maco"]


def test_presets_registered_and_serializable():
    assert list(all_presets()) == list(PRESETS) + ["lucid", "maco"]
    assert get_preset("lucid") is LUCID
    d = MACO.to_dict()
    assert d["kind"] == "modern" and d["param"] == "maco" and d["transparency"] is True
    assert (LUCID.param, LUCID.decorrelate, LUCID.transforms, LUCID.lr, LUCID.steps) == ("fourier", True, "standard", 0.05, 512)


def test_batched_equals_one_at_a_time(lite0):
    """float64: an image does not depend on the batch it is in (own seeds, per-image transforms)."""
    m = copy.deepcopy(lite0.module).double()
    kw = dict(model_name="m", steps=4, size=32)
    both = optimize_modern(m, lite0.preprocessing, "_blocks.3", [2, 5], [LUCID, MACO], **kw)
    assert [(r.unit, r.preset) for r in both] == [(2, "lucid"), (2, "maco"), (5, "lucid"), (5, "maco")]
    for r in both:
        alone = optimize_modern(m, lite0.preprocessing, "_blocks.3", [r.unit], [get_preset(r.preset)], **kw)[0]
        assert torch.allclose(r.image, alone.image, atol=1e-6), (r.unit, r.preset)
        assert r.activation == pytest.approx(alone.activation, rel=1e-6)
    maco = both[1]
    assert maco.alpha is not None and maco.alpha.shape == (32, 32)
    assert float(maco.alpha.min()) >= 0 and float(maco.alpha.max()) == pytest.approx(1.0)
    assert both[0].alpha is None


def test_mixed_presets_keep_order(lite0):
    res = optimize_units(lite0.module, lite0.preprocessing, "_fc", [3, 7], [LUCID, PRESETS["yosinski-3"]],
                         model_name="m", steps=3, size=32)
    assert [(r.unit, r.preset) for r in res] == [(3, "lucid"), (3, "yosinski-3"), (7, "lucid"), (7, "yosinski-3")]


def test_gram_similarity_against_numpy():
    f = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    got = float(gram_similarity(f, [[0, 1, 2], [3]]))
    grams = [a.reshape(3, -1) @ a.reshape(3, -1).T / 25 for a in f.numpy()]
    flat = [g.ravel() / np.linalg.norm(g) for g in grams]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert got == pytest.approx(np.mean([flat[i] @ flat[j] for i, j in pairs]))


def test_diversity_makes_the_images_of_a_unit_differ(lite0):
    kw = dict(model_name="m", steps=24, size=48)
    plain = optimize_modern(lite0.module, lite0.preprocessing, "_blocks.5", [4], [LUCID], diversity=3,
                            **kw)
    import deepvis.tasks.modern as M
    weight = M.DIVERSITY_WEIGHT
    try:
        M.DIVERSITY_WEIGHT = 0.0
        same = optimize_modern(lite0.module, lite0.preprocessing, "_blocks.5", [4], [LUCID], diversity=3, **kw)
    finally:
        M.DIVERSITY_WEIGHT = weight
    assert [r.index for r in plain] == [0, 1, 2]
    from deepvis.tasks.hooks import hooked
    from deepvis.tasks.preprocess import normalize

    def sim(rs):
        x = torch.stack([normalize(r.image, lite0.preprocessing) for r in rs])
        with torch.no_grad(), hooked(lite0.module, ["_blocks.5"]) as run:
            return float(gram_similarity(run(x)["_blocks.5"], [[0, 1, 2]]))
    assert sim(plain) < sim(same) - 0.01, (sim(plain), sim(same))


def test_measure_matches_direct_computation(lite0):
    from deepvis.tasks.grid import layer_activations
    from deepvis.tasks.preprocess import normalize
    res = optimize_units(lite0.module, lite0.preprocessing, "_blocks.3", [1, 2], [PRESETS["yosinski-3"], LUCID],
                         model_name="m", steps=5, size=48)
    q = measure(lite0.module, lite0.preprocessing, "_blocks.3", res, "m")
    for r, m in zip(res, q):
        acts = layer_activations(lite0.module, "_blocks.3", normalize(r.image, lite0.preprocessing))
        assert m["act"] == pytest.approx(float(acts[r.unit].max()), rel=1e-5)
        assert m["hf"] > 0 and np.isfinite(m["robust"])
    # deterministic and batch-free: measuring one result alone gives the same numbers
    alone = measure(lite0.module, lite0.preprocessing, "_blocks.3", res[3:], "m")[0]
    assert alone == pytest.approx(q[3], rel=1e-5)


def test_finite_measures_skip_undefined():
    from deepvis.tasks.quality import finite, finite_mean
    nan, inf = float("nan"), float("inf")
    assert finite([1.0, nan, None, 3.0, inf, -inf, 0.0]) == [1.0, 3.0, 0.0]
    assert finite_mean([1.0, nan, None, 4.0]) == 2.5
    assert math.isnan(finite_mean([nan, None])) and math.isnan(finite_mean([]))


@pytest.mark.benchmark   # 3 presets x 5 units x 256 steps at 128 px: about 3 minutes (`make test-benchmarks`)
@pytest.mark.skipif(not DATASET.is_dir(), reason="needs the imagenet-sample dataset")
def test_class_units_beat_the_dataset_and_lucid_maco_are_more_robust(lite0):
    """5 class units at 128 px, 256 steps each: every preset beats every dataset image on its class
    logit, and the lucid and maco images keep more of their class logit under random
    jitter/scale/rotation than yosinski-3's: tasks.quality's `robust` (the atlas's robust_<preset>: the
    mean over 8 seeded transforms of the activation kept, relative to the untransformed image's).
    The class probability this test used before saturates near 1 (lucid 1.0, yosinski-3 0.982, maco
    0.974 at 2 threads, 2026-12-03): a ratio of logits does not."""
    from deepvis.tasks.preprocess import normalize
    from deepvis.tasks.quality import measure
    presets = [PRESETS["yosinski-3"], LUCID, MACO]
    res = optimize_units(lite0.module, lite0.preprocessing, "_fc", CLASSES, presets, model_name=lite0.name,
                         steps=256, size=128)
    data = _dataset_logits(lite0)
    kept = {}
    for p in presets:
        rs = [r for r in res if r.preset == p.name]
        x = torch.stack([r.image for r in rs])
        with torch.no_grad():
            logits = lite0.module(normalize(x, lite0.preprocessing))
        for i, c in enumerate(CLASSES):
            assert float(logits[i, c]) > float(data[:, c].max()), (p.name, c, float(logits[i, c]), float(data[:, c].max()))
        robust = [m["robust"] for m in measure(lite0.module, lite0.preprocessing, "_fc", rs, lite0.name)]
        kept[p.name] = sum(robust) / len(robust)
    print("mean class logit kept under jitter/scale/rotation:", kept)
    assert kept["lucid"] > kept["yosinski-3"] and kept["maco"] > kept["yosinski-3"], kept


def test_tune_scores_and_ranks(lite0):
    from deepvis.tasks.tune import sample_presets, score, tune
    ps = sample_presets(5, seed=3, steps=6)
    assert ps == sample_presets(5, seed=3, steps=6) and ps != sample_presets(5, seed=4, steps=6)
    for p in ps:
        assert 0 <= p.decay <= 0.3 and p.lr_policy in ("constant", "progress")
    trials = tune(lite0, "_fc", [1, 2], ps, size=32, reference={1: 10.0, 2: 10.0}, batch=4)
    assert sorted(t.preset.name for t in trials) == sorted(p.name for p in ps)
    assert [t.score for t in trials] == sorted((t.score for t in trials), reverse=True)
    for t in trials:   # the reported score is the formula over the reported per-unit numbers
        assert t.score == pytest.approx(score([m["ratio"] for m in t.per_unit], [m["robust"] for m in t.per_unit],
                                              [m["hf"] for m in t.per_unit]))
        for m in t.per_unit:
            assert m["ratio"] == pytest.approx(m["act"] / 10.0)
    assert score([1.0, 3.0], [0.5, 2.0], [4.0]) == pytest.approx(1.5 * 0.75 / 4.0)


@pytest.mark.benchmark   # 1,500 steps at 128 px: 3-5 minutes on 2 cores (`make test-benchmarks`)
@pytest.mark.skipif(not DATASET.is_dir(), reason="needs the imagenet-sample dataset")
def test_paper_progress_presets_beat_the_dataset_at_their_own_steps(lite0):
    """yosinski-1 (500 steps) and yosinski-4 (1000) at 128 px reach the best sample photo's class logit
    (bench/presets.py: margins +0.6 and +1.5 on the machine that measured them). yosinski-2 does not (margin -8.5 at 750
    steps: starfish stays at logit 1.0). On 40 random classes (BENCHMARKS.md) the paper's verbatim
    yosinski-1/-2/-4 beat every photo on 35/25/30 of 40, yosinski-3, lucid and maco on all 40: a
    measured property of the CaffeNet-tuned presets on this model (README), which `deepvis compare`
    shows as ratio < 1."""
    from deepvis.tasks.preprocess import normalize
    data = _dataset_logits(lite0)
    for name in ("yosinski-1", "yosinski-4"):
        res = optimize_units(lite0.module, lite0.preprocessing, "_fc", CLASSES, [PRESETS[name]],
                             model_name=lite0.name, size=128)
        assert res[0].steps == PRESETS[name].steps
        x = torch.stack([r.image for r in res])
        with torch.no_grad():
            logits = lite0.module(normalize(x, lite0.preprocessing))
        # FORMAT.md: the paper's verbatim yosinski-1/-4 need not beat every photo on this model, and
        # their large steps amplify the CPU kernels' rounding (tasks/optimize.py), so which classes
        # end above the best photo varies with the thread count and what ran before in the process:
        # on this 2-core CPU yosinski-1 gave 4/5 above (weakest 0.917x) alone and 3/5 (0.864x) in the
        # suite; yosinski-4 4/5 (0.955x). Asserted: on average above the best photo, a majority of the
        # classes above it, and none below 0.75x.
        ratios = [float(logits[i, c]) / float(data[:, c].max()) for i, c in enumerate(CLASSES)]
        assert sum(ratios) / len(ratios) > 1 and sum(r > 1 for r in ratios) > len(ratios) / 2 \
            and min(ratios) > 0.75, (name, ratios)


def test_tune_splits_units_beyond_the_batch(lite0):
    """More sample units than --batch: the units are optimized in chunks of at most `batch` images,
    with the same results (per-unit seeds) as one big batch."""
    from unittest import mock

    import deepvis.tasks.tune as tune_mod
    ps = tune_mod.sample_presets(1, seed=5, steps=3)
    sizes = []
    real = tune_mod.optimize_units

    def spy(module, pre, layer, units, presets, **kw):
        sizes.append(len(units) * len(presets))
        return real(module, pre, layer, units, presets, **kw)
    with mock.patch.object(tune_mod, "optimize_units", spy):
        small = tune_mod.tune(lite0, "_fc", [1, 2, 3], ps, size=32, reference={u: 10.0 for u in (1, 2, 3)}, batch=2)
    assert sizes == [2, 1]
    big = tune_mod.tune(lite0, "_fc", [1, 2, 3], ps, size=32, reference={u: 10.0 for u in (1, 2, 3)}, batch=64)
    assert [m["unit"] for m in small[0].per_unit] == [1, 2, 3]
    for a, b in zip(small[0].per_unit, big[0].per_unit):
        assert a["act"] == pytest.approx(b["act"], rel=1e-3, abs=1e-4)
