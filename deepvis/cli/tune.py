"""`deepvis tune --model M --layer L`: the paper's random search over regularization hyperparameters
(they tried 300 combinations and picked four by eye), scored by measured quality on a sample of
units (tasks.tune). Prints the best settings and writes them as a presets file that `deepvis build
--presets-file` and `deepvis optimize --presets-file` take."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from deepvis.cli.layers import add_model_args


def add_parser(sub):
    p = sub.add_parser("tune", help="random search for regularization hyperparameters, scored by quality",
                       description="Draw TRIALS random regularization settings (L2 decay, blur width and "
                                   "period, norm and contribution clipping, learning rate and policy; the "
                                   "ranges the paper explored), optimize the sample units with each, and "
                                   "score them: mean(min(ratio, 2)) x mean(robust) / max(1, median hf), where "
                                   "ratio = activation / the unit's top dataset activation, robust = activation "
                                   "kept under jitter/scale/rotation, hf = high-frequency energy vs natural "
                                   "photos. Writes the best as a presets file (--out).")
    p.add_argument("--model", required=True,
                   help="model spec: efficientnet_lite0 (offline), torchvision:<name> or package.module:callable")
    add_model_args(p)
    p.add_argument("--layer", required=True, help="the layer whose units are the sample")
    p.add_argument("--units", default="0:4", help="sample units: a range 0:8 or a list 1,5,9 (default: 0:4)")
    p.add_argument("--trials", type=int, default=300, help="random settings to try (default: 300, as the paper)")
    p.add_argument("--steps", type=int, default=200, help="optimization steps per trial (default: 200)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's input)")
    p.add_argument("--dataset", default=None,
                   help="image folder for the reference (each unit's top activation over it); without it "
                        "(or --atlas) a trial's activation is compared with the best trial's")
    p.add_argument("--images", type=int, default=200, help="at most this many dataset images (default: 200)")
    p.add_argument("--atlas", default=None, help="take the reference from this atlas's index/units.parquet instead")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search (default: 0)")
    p.add_argument("--top", type=int, default=10, help="settings to print and write (default: 10)")
    p.add_argument("--batch", type=int, default=64, help="images per optimization batch (default: 64)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="tuned-presets.toml", help="presets file to write (default: tuned-presets.toml)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def _reference(args, lm, units):
    from deepvis.storage import layout
    from deepvis.storage.datasets import BadImage, dataset_root, list_images, read_image
    from deepvis.storage.store import open_store
    from deepvis.tasks.errors import UserError
    from deepvis.tasks.preprocess import preprocess
    from deepvis.tasks.tune import dataset_top

    if args.atlas:
        store = open_store(args.atlas)
        layout.read_manifest(store)
        rows = layout.read_table(store, layout.UNITS, filters=[("layer", "=", args.layer)]).to_pylist()
        ref = {r["unit"]: r["max"] for r in rows if r["unit"] in units and r["max"] == r["max"]}
        missing = sorted(set(units) - set(ref))
        if missing:
            raise UserError(f"the atlas has no dataset statistics for {args.layer}:{missing[0]} "
                            f"(built without --dataset, or the unit was not selected)")
        return ref, f"top activations from {store.uri}"
    if args.dataset:
        ids = list_images(args.dataset)[: args.images]
        root = dataset_root(args.dataset)

        def images():
            for i in ids:
                try:
                    yield preprocess(read_image(root, i), lm.preprocessing)
                except BadImage:
                    continue
        return dataset_top(lm, args.layer, units, images()), f"top activations over {len(ids)} images of {args.dataset}"
    return None, "no dataset: ratio = activation / the best trial's for the unit"


def run(args) -> int:
    from tqdm import tqdm

    from deepvis.cli.args import resolve_device
    from deepvis.cluster.config import parse_units
    from deepvis.tasks.errors import UserError
    from deepvis.tasks.layers import resolve_layers
    from deepvis.tasks.models import load_model
    from deepvis.tasks.tune import sample_presets, tune

    for name in ("trials", "steps", "top", "batch", "images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.size is not None and args.size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {args.size}")
    device = resolve_device(args.device)
    lm = load_model(args.model, args.weights, device=device)
    (info,) = resolve_layers(lm.module, lm.input_size, [args.layer])    # unknown layer -> UserError
    units = parse_units(args.units, info.units, args.layer)
    reference, ref_note = _reference(args, lm, units)
    presets = sample_presets(args.trials, args.seed, args.steps)
    size = args.size or lm.input_size
    bar = tqdm(total=len(presets), desc=f"tune {args.layer}", unit="trial", disable=None)
    try:
        trials = tune(lm, args.layer, units, presets, size=size, device=device, reference=reference,
                      batch=args.batch, on_batch=bar.update)
    finally:
        bar.close()
    best = trials[: args.top]
    out = Path(args.out)
    lines = [f"# deepvis tune --model {args.model} --layer {args.layer} --units {args.units} --trials {args.trials} "
             f"--steps {args.steps} --size {size} --seed {args.seed}", f"# {ref_note}", ""]
    for rank, t in enumerate(best, 1):
        p = t.preset
        lines += [f"[tuned-{rank}]   # {p.name}: score {t.score:.4g}, ratio {t.ratio:.3g}, robust {t.robust:.3g}, hf {t.hf:.3g}",
                  # every Preset field but the name (the table's header), as TOML: JSON's numbers and strings are TOML's
                  *(f"{k} = {json.dumps(v)}" for k, v in p.to_dict().items() if k != "name"), ""]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines))
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r} ({e.strerror})") from None
    if args.json:
        json.dump([{"name": f"tuned-{i}", "trial": t.preset.name, "score": t.score, "ratio": t.ratio,
                    "robust": t.robust, "hf": t.hf, "preset": t.preset.to_dict(), "units": t.per_unit}
                   for i, t in enumerate(best, 1)], sys.stdout, indent=1, default=float)
        print()
    else:
        print(f"{len(trials)} trials on {args.layer} units {units[0]}..{units[-1]} ({ref_note})")
        print(f"{'rank':>4}  {'score':>7}  {'ratio':>6}  {'robust':>6}  {'hf':>6}  decay    blur      norm% contrib%  lr")
        for i, t in enumerate(best, 1):
            p = t.preset
            blur = f"{p.blur_width:g}/{p.blur_every}" if p.blur_every else "-"
            lr = f"{p.lr:g}" if p.lr_policy == "constant" else f"progress({p.lr:g})"
            print(f"{i:>4}  {t.score:>7.3f}  {t.ratio:>6.2f}  {t.robust:>6.2f}  {t.hf:>6.2f}  {p.decay:<8g} "
                  f"{blur:<9} {p.norm_pct:>5g} {p.contrib_pct:>8g}  {lr}")
    print(f"wrote {out} (use: deepvis build --presets-file {out} --presets tuned-1)", file=sys.stderr)
    return 0
