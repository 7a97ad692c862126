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
    p.add_argument("--model", help="with --image: the model spec to run (default: the atlas's model when it is "
                                   "built in; a package.module:callable model must be named here, since an "
                                   "atlas never chooses code to run)")
    p.add_argument("--weights", help="with --image: the state_dict the atlas was built with, when it was built "
                                     "with --weights PATH")
    p.add_argument("--save", metavar="DIR", help="with --layer/--unit: also write each row's receptive-field crop "
                                               "to DIR as <kind>-<rank>.jpg (cut from the atlas's stored image)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    from deepvis.api import open_atlas
    from deepvis.tasks.errors import UserError

    atlas = open_atlas(args.store, args.endpoint_url)
    if args.image:
        return print_image_query(atlas, args)
    if args.layer is None or args.unit is None:
        raise UserError("give --layer and --unit (or --image FILE); `deepvis status STORE` lists the layers")
    kind = "bottom" if args.bottom else "top"
    rows = atlas.reader.top_images(args.layer, args.unit, args.k, kind)
    if args.save:
        save_crops(atlas, args.layer, args.unit, args.k, kind, args.save)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'rank':>4} {'activation':>11} {'y':>3} {'x':>3}  image  ->  crop")
    for r in rows:
        # the object holding the crop (any layout, storage.atlas.crop_ref) and, for an atlas of
        # schema 3, the box to cut from that input image; none when never written
        where = r["crop"] or "(no crop)"
        if r["crop"] and r.get("crop_box"):
            where += " box {},{},{},{}".format(*r["crop_box"])
        print(f"{r['rank']:>4} {r['activation']:>11.4f} {r['y']:>3} {r['x']:>3}  {r['image']}  ->  {where}")
    return 0


def save_crops(atlas, layer: str, unit: int, k: int, kind: str, out: str) -> None:
    """--save DIR: the rows' crops as JPEG files; a crop that was never written or is missing is
    skipped with a note on stderr (the others are still written)."""
    import os
    import sys

    from deepvis.storage.errors import StoreError
    from deepvis.tasks.errors import UserError

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--save {out!r}: cannot create the directory ({e.strerror}); name a writable one") from None
    u = atlas.unit(layer, unit)
    for r in (u.top(k) if kind == "top" else u.bottom(k)):
        try:
            data = r.crop_bytes
        except StoreError as e:
            print(f"deepvis query: {kind} {r.rank}: no crop saved: {e}", file=sys.stderr)
            continue
        with open(os.path.join(out, f"{kind}-{r.rank}.jpg"), "wb") as f:
            f.write(data)


def print_image_query(atlas, args) -> int:
    """--image: the reverse query of the Python API (deepvis.Atlas.query_image), printed."""
    from dataclasses import asdict

    hits = atlas.query_image(args.image, args.layer, args.k, model=args.model, weights=args.weights)
    if args.json:
        print(json.dumps([asdict(h) for h in hits]))
        return 0
    print(f"{'layer':<24} {'unit':>5} {'activation':>11} {'/ dataset max':>13}")
    for h in hits:
        print(f"{h.layer:<24} {h.unit:>5} {h.activation:>11.4f} {h.relative:>13.3f}")
    return 0
