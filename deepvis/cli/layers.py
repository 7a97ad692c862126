"""`deepvis layers MODEL`: list the hookable layers with output shape and unit count."""
from __future__ import annotations

import json


def add_model_args(p, weights_help: str = "default: the model's trained weights") -> None:
    p.add_argument("--weights", default=None,
                   help=f"'none' for random init, or a local state_dict path ({weights_help})")


def add_parser(sub):
    p = sub.add_parser("layers", help="list a model's layers, shapes and unit counts",
                       description="List the hookable layers of MODEL in forward order: name, kind "
                                   "(conv/linear/block), output shape and units. MODEL is "
                                   "'efficientnet_lite0' (offline), 'torchvision:<name>' or "
                                   "'package.module:callable'.")
    p.add_argument("model", help="model spec, e.g. efficientnet_lite0 or torchvision:resnet18")
    add_model_args(p)
    p.add_argument("--layers", default=None,
                   help="comma-separated names or globs to show (default: every layer)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, kind, shape, units} in forward order")
    return p


def run(args) -> int:
    from deepvis.tasks.layers import resolve_layers
    from deepvis.tasks.models import load_model

    lm = load_model(args.model, args.weights)
    infos = resolve_layers(lm.module, lm.input_size, args.layers)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos]))
        return 0
    w = max([len(i.name) for i in infos] + [5])
    print(f"{'layer':<{w}}  {'kind':<6}  {'shape':<16}  units")
    for i in infos:
        print(f"{i.name:<{w}}  {i.kind:<6}  {'x'.join(map(str, i.shape)):<16}  {i.units}")
    print(f"{len(infos)} layers, {sum(i.units for i in infos)} units")
    return 0
