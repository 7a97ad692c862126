"""`deepvis query`: the top (or bottom) images of a unit, or the units a new image excites most."""
from __future__ import annotations

import json

from deepvis.cli.args import add_store_args


def add_parser(sub):
    p = sub.add_parser("query", help="top images of a unit, or top units of an image",
                       description="With --layer and --unit: the k images of the dataset that activate the "
                                   "unit most (or least, --bottom), read from index/topk.parquet. With --image: "
                                   "run the model on a new image and list the units it excites most, relative "
                                   "to each unit's maximum over the dataset.")
    add_store_args(p)
    p.add_argument("--layer", help="layer name (as in `deepvis status`)")
    p.add_argument("--unit", type=int, help="unit (channel) index")
    p.add_argument("-k", type=int, default=9, help="how many rows (default: 9)")
    p.add_argument("--bottom", action="store_true", help="the lowest activations instead of the highest")
    p.add_argument("--image", help="an image file: list the units it excites most")
    p.add_argument("--model", default=None,
                   help="with --image: the model spec to run (default: the atlas's model when it is a built-in "
                        "one; an atlas never chooses code to run, so a package.module:callable model must be "
                        "given here)")
    p.add_argument("--weights", default=None,
                   help="with --image: a local state_dict path (default: the atlas's default or random weights; "
                        "a checkpoint the atlas names must be given here)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    from deepvis.storage.atlas import Atlas
    from deepvis.storage.store import open_store
    from deepvis.tasks.errors import UserError

    atlas = Atlas.open(open_store(args.store, args.endpoint_url, must_exist=True))
    if args.image:
        rows = image_query(atlas, args.image, args.layer, args.k, args.model, args.weights)
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'layer':<24} {'unit':>5} {'activation':>11} {'/ dataset max':>13}")
            for r in rows:
                print(f"{r['layer']:<24} {r['unit']:>5} {r['activation']:>11.4f} {r['relative']:>13.3f}")
        return 0
    if args.layer is None or args.unit is None:
        raise UserError("give --layer and --unit (or --image FILE); `deepvis status STORE` lists the layers")
    rows = atlas.top_images(args.layer, args.unit, args.k, "bottom" if args.bottom else "top")
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'rank':>4} {'activation':>11} {'y':>3} {'x':>3}  image  ->  crop")
    for r in rows:
        print(f"{r['rank']:>4} {r['activation']:>11.4f} {r['y']:>3} {r['x']:>3}  {r['image']}  ->  {r['crop']}")
    return 0


def image_query(atlas, path: str, layer: str | None, k: int, model: str | None = None,
                weights: str | None = None) -> list[dict]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from deepvis.tasks.activations import batch_unit_maxima
    from deepvis.tasks.errors import UserError
    from deepvis.tasks.models import load_model, trusted_model_spec, trusted_weights
    from deepvis.tasks.preprocess import preprocess

    m = atlas.manifest.get("model") or {}
    spec = trusted_model_spec(m.get("name"), model)     # before anything is loaded
    weights = trusted_weights(m.get("weights"), weights)
    layers = [layer] if layer else list(atlas.layers)
    if layer:
        atlas.check_unit(layer, 0)
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path!r} ({e}); pass a JPEG/PNG file") from None
    lm = load_model(spec, weights)
    out = batch_unit_maxima(lm.module, layers, preprocess(img, lm.preprocessing)[None])
    stats = {(r["layer"], r["unit"]): r for r in atlas.unit_stats(layer)}
    rows = []
    for name in layers:
        vals = out[name][0][0].numpy()
        for u in atlas.layers[name].get("selected") or range(len(vals)):
            mx = stats.get((name, u), {}).get("max")
            if mx is None or not np.isfinite(mx) or mx <= 0:
                continue
            rows.append({"layer": name, "unit": int(u), "activation": float(vals[u]), "relative": float(vals[u] / mx)})
    rows.sort(key=lambda r: (-r["relative"], r["layer"], r["unit"]))
    return rows[:k]
