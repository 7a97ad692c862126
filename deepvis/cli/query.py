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
    rows = atlas.reader.top_images(args.layer, args.unit, args.k, "bottom" if args.bottom else "top")
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'rank':>4} {'activation':>11} {'y':>3} {'x':>3}  image  ->  crop")
    for r in rows:
        # the crop's key in the atlas (either layout, storage.atlas.crop_key); none when never written
        print(f"{r['rank']:>4} {r['activation']:>11.4f} {r['y']:>3} {r['x']:>3}  {r['image']}  ->  "
              f"{r['crop'] or '(no crop)'}")
    return 0


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
