"""`deepvis optimize`: regularized activation maximization of one unit (Yosinski et al. 2015).

Writes <out>/<preset>.png (the best iterate of each preset) and <out>/result.json (model, layer,
unit, each preset's hyperparameters, steps, size, activation reached, dead, and the activation every
10 steps). All presets run in one batch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from deepvis.cli.layers import add_model_args


def add_parser(sub):
    p = sub.add_parser("optimize", help="synthesize the image that maximizes one unit (regularized optimization)",
                       description="Optimize an image to maximize one unit of a layer with the paper's "
                                   "regularizers (L2 decay, Gaussian blur, norm and contribution clipping). "
                                   "Conv units are taken at the spatial centre; class units are the units "
                                   "of the last (logit) layer. Writes OUT/<preset>.png and OUT/result.json.")
    p.add_argument("--model", required=True,
                   help="model spec: efficientnet_lite0 (offline), torchvision:<name> or package.module:callable")
    add_model_args(p)
    p.add_argument("--layer", required=True, help="layer name (see `deepvis layers MODEL`), e.g. _fc")
    p.add_argument("--unit", required=True, type=int, help="channel / class index in the layer")
    p.add_argument("--preset", default="yosinski-3",
                   help="preset name (yosinski-1..4, lucid, maco), comma-separated names, or 'all' "
                        "(default: yosinski-3)")
    p.add_argument("--presets-file", default=None, metavar="FILE",
                   help="TOML or JSON file with extra presets: a table per preset with the fields "
                        "decay, blur_width, blur_every, norm_pct, contrib_pct, steps, lr, lr_policy "
                        "(or base = 'yosinski-3' to start from a built-in one)")
    p.add_argument("--steps", type=int, default=None, help="override every preset's number of steps")
    p.add_argument("--size", type=int, default=None,
                   help="image size in pixels (default: the model's input size), e.g. 64 on a CPU")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--stretch", action="store_true",
                   help="write contrast-stretched PNGs (the mean image at mid-grey, the largest deviation "
                        "at full range, as the paper's toolbox displays them); default: the optimized "
                        "image itself, which reaches the reported activation")
    p.add_argument("--out", required=True, help="output directory")
    return p


def _select_presets(spec: str, known: dict):
    from deepvis.tasks.optimize import get_preset

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise_user(f"no preset given; known presets: {', '.join(known)}")
    if "all" in names:
        return list(known.values())
    return [get_preset(n, known) for n in dict.fromkeys(names)]


def raise_user(msg: str):
    from deepvis.tasks.errors import UserError
    raise UserError(msg)


def run(args) -> int:
    from deepvis.cli.args import resolve_device
    from deepvis.tasks.models import load_model
    from deepvis.tasks.modern import is_modern
    from deepvis.tasks.optimize import all_presets, load_presets, optimize_units, result_image
    from deepvis.tasks.quality import measure

    known = dict(all_presets())
    if args.presets_file:
        known.update(load_presets(args.presets_file))
    presets = _select_presets(args.preset, known)
    if args.steps is not None and args.steps < 1:
        raise_user(f"--steps must be >= 1 (got {args.steps})")
    if args.size is not None and args.size < 8:
        raise_user(f"--size must be >= 8 pixels (got {args.size})")
    if args.unit < 0:
        raise_user(f"--unit must be >= 0 (got {args.unit})")
    device = resolve_device(args.device)
    out = _out_dir(args.out)   # before the compute: a bad --out must not cost minutes first

    lm = load_model(args.model, args.weights, device=device)
    results = optimize_units(lm.module, lm.preprocessing, args.layer, [args.unit], presets,
                             model_name=args.model, steps=args.steps, size=args.size, device=device,
                             progress=True)
    label = _label(lm, args.layer, args.unit)
    entries = []
    quality = measure(lm.module, lm.preprocessing, args.layer, results, lm.name, device)
    for p, r, q in zip(presets, results, quality):
        png = f"{_safe(r.preset)}.png"
        # modern images are natural-looking already: never stretched
        result_image(r, lm.preprocessing, stretch=args.stretch and not is_modern(p)).save(out / png)
        entries.append({**p.to_dict(), "steps": r.steps, "image": png, "activation": r.activation,
                        "dead": r.dead, "seed": r.seed, "quality": q,
                        "history": [{"step": s, "activation": a} for s, a in zip(r.history_steps, r.history)]})
        state = "dead (zero gradient)" if r.dead else f"activation {r.activation:.4g}"
        print(f"{r.preset}: {state} after {r.steps} steps at {r.size} px (hf {q['hf']:.2f}x natural, "
              f"robust {q['robust']:.2f}) -> {out / png}")
    doc = {"model": args.model, "weights": lm.weights, "layer": args.layer, "unit": args.unit,
           "label": label, "steps": args.steps, "size": results[0].size, "device": str(device),
           "png": "stretched" if args.stretch else "raw", "presets": entries}
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "result.json")
    print(f"wrote {out / 'result.json'}", file=sys.stderr)
    return 0


def _out_dir(path: str) -> Path:
    """--out made (or found) as a writable directory, else a one-line UserError."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise_user(f"--out {path!r} is an existing file, not a directory; pass a directory (it is created)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_user(f"cannot create the --out directory {path!r} ({e.strerror}); pass a directory you can write")
    if not os.access(out, os.W_OK | os.X_OK):
        raise_user(f"--out directory {path!r} is not writable; pass a directory you can write")
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _label(lm, layer: str, unit: int):
    """The class name when the layer is the model's last Linear and the model has labels."""
    from torch import nn
    if not lm.labels:
        return None
    linears = [n for n, m in lm.module.named_modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1] == layer and unit < len(lm.labels):
        return lm.labels[unit]
    return None

