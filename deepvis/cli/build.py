"""`deepvis build`: the full-network atlas build on a Ray cluster."""
from __future__ import annotations

import logging
import sys

from deepvis.cli.args import ENDPOINT_HELP
from deepvis.cluster.config import BuildConfig

HELP = {
    "model": "model spec: efficientnet_lite0 (offline, default), torchvision:<name>, package.module:callable",
    "weights": "'none' for random init or a local state_dict path (default: the model's trained weights)",
    "layers": "comma-separated layer names or globs, e.g. '_blocks.*,_fc' (default: every layer; see `deepvis layers`)",
    "units": "units of each selected layer: a range like 0:64 or a list like 1,5,9 (default: all)",
    "presets": "comma-separated optimization presets: the paper's yosinski-1..4, lucid (Fourier + decorrelated colour + transforms), maco (phase-only, natural magnitude, with a transparency map); 'all', or 'none' to skip the optimization pass (default: yosinski-3)",
    "diversity": "N images per unit for the modern presets (lucid, maco), made to differ (Gram-matrix diversity); stored as <preset>.png, <preset>.1.png, ... (default: 1)",
    "diversity_layer": "layer whose Gram matrices the diversity term compares (default: the unit's layer)",
    "presets_file": "TOML/JSON file defining extra presets",
    "steps": "override the presets' optimization steps (e.g. 50 for a quick CPU look)",
    "size": "override the optimization image size in pixels (e.g. 64 on a CPU)",
    "dataset": "image folder, s3://bucket/prefix, or a text file of image paths (one a line; relative "
               "ones are relative to the list file's directory) for the top-k dataset pass (default: no "
               "dataset pass)",
    "k": "top-k and bottom-k images kept per unit (default: 9)",
    "out": "the atlas store: a directory or s3://bucket/prefix (default: ./atlas)",
    "endpoint_url": ENDPOINT_HELP,
    "address": "Ray cluster to join: 'auto' or ray://host:10001 (default: start a local cluster)",
    "actors": "number of actors (default: one per GPU, else one per CPU core)",
    "device": "cpu or cuda (default: cuda when the actor has a GPU)",
    "shard_units": "units per optimization shard (default: sized for the device)",
    "shard_images": "most images per dataset shard; shards are whole batches, balanced over the actors; "
                    "each leaves a partial state of every unit to merge (default: 200 on CPU actors, "
                    "4096 on GPU actors)",
    "batch_size": "images per forward pass in the dataset pass (default: 8 on CPU actors, whose caches "
                  "hold a small batch's maps; 32 on GPU actors)",
    "max_attempts": "attempts before a shard is reported failed (default: 3)",
    "actor_timeout": "seconds to wait for actors to be placed and loaded; those still waiting are reported "
                     "and the build goes on without them, or stops if none is ready (default: 300)",
    "precision": "fp32, bf16 or fp16: autocast and channels_last for both passes on a GPU (default: fp32; "
                 "CPU actors compute in fp32)",
    "decoder": "the dataset pass's JPEG decoder: pil; torchvision (torchvision.io.decode_jpeg on the "
               "decode processes' CPUs); or nvjpeg (GPU actors only: the RGB and grey JPEGs, local or s3://, "
               "decoded and cropped on the GPU in whole batches, other files on the CPUs). Recorded in "
               "the manifest (default: pil)",
}


def add_parser(sub):
    p = sub.add_parser("build", help="build an atlas: optimized images and top-k images of every unit",
                       description="Build a per-unit atlas of MODEL on a Ray cluster (local by default): "
                                   "regularized activation maximization per unit (--presets) and a top-k "
                                   "dataset pass (--dataset), written to --out. Re-running the same command "
                                   "resumes: finished shards are skipped.")
    p.add_argument("--config", help="TOML file with the same keys as these flags (flags win); unknown keys are rejected")
    for key in BuildConfig.keys():
        if key in ("progress", "force", "dry_run"):
            continue
        typ = int if key in ("steps", "size", "k", "actors", "shard_units", "shard_images", "batch_size",
                             "max_attempts", "diversity", "actor_timeout") else str
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None, help=HELP[key])
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (e.g. in CI logs)")
    p.add_argument("--force", dest="force", action="store_true", default=None,
                   help="take over the store's build lease from another build. A running build refreshes "
                        "its lease every 30 s and one silent for over 2 minutes is dead (`deepvis status` "
                        "says which); a live one is taken over too, with a warning, and then both write "
                        "the atlas: stop it first")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", default=None,
                   help="print the plan (layers, units, shards, objects, bytes) and a time estimate for "
                        "this machine's device; compute nothing, start no Ray, write nothing")
    p.add_argument("--json", action="store_true", help="print the summary (or the dry-run plan) as JSON")
    return p


def config_from_args(args) -> BuildConfig:
    given = {k: getattr(args, k) for k in BuildConfig.keys() if getattr(args, k, None) is not None}
    if args.config:
        return BuildConfig.from_toml(args.config, given)
    return BuildConfig.from_dict(given, origin="flags")


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout   # looked up at call time (a default would pin the import-time stream)
    print(f"atlas: {s['atlas']}  [{s['status']}]", file=out)
    print(f"  {s['units']} units in {s['layers']} layers; {s['dead_units']} dead; "
          f"{s['shards_computed']} shards computed, {s['shards_skipped']} skipped (already finished)", file=out)
    if s["images"]:
        print(f"  dataset: {s['images_seen']} images searched, {s['images_skipped']} skipped as unreadable", file=out)
        for line in _skip_reasons(s.get("skipped_images") or []):
            print(f"    {line}", file=out)
    if s.get("actors_lost"):
        print(f"  {s['actors_lost']} actor(s) lost (process or node); their shards were redone", file=out)
    for f in s["failed_shards"]:
        print(f"  FAILED shard {f['id']}: {f['error']}", file=out)
    print(f"  time: {s['seconds']:.1f} s", file=out)
    if s.get("phases"):
        print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["phases"].items()), file=out)
    if s["status"] == "complete":
        print(f"  look: deepvis status {s['atlas']}", file=out)


def _skip_reasons(skipped: list[dict], most: int = 5) -> list[str]:
    """The skipped images grouped by reason (the text before its first ':'), most common first, each
    with a count and its first image: what to fix, without the whole list (that is the manifest's
    dataset.skipped)."""
    groups: dict[str, list[str]] = {}
    for x in skipped:
        groups.setdefault(str(x.get("reason", "")).split(":")[0] or "unknown", []).append(str(x.get("image")))
    ranked = sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))
    lines = [f"{len(ids)} {reason}, e.g. {ids[0]!r}" for reason, ids in ranked[:most]]
    if len(ranked) > most:
        lines.append(f"{sum(len(ids) for _, ids in ranked[most:])} more for other reasons")
    return lines + (["every image and its reason: manifest.json, dataset.skipped"] if lines else [])


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names) if len(names) <= 2 * n else ", ".join(names[:n] + ["..."] + names[-n:])


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def print_dry_run(d: dict, out=None) -> None:
    out = out or sys.stdout   # looked up at call time (a default would pin the import-time stream)
    o, b, sec, sh = d["objects"], d["bytes"], d["seconds"], d["shards"]
    done = d.get("shards_done") or {}
    say = lambda *a: print(*a, file=out)  # noqa: E731
    say(f"dry run: nothing computed, nothing written ({d['atlas']})")
    say(f"  model: {d['model']}   device: {d['device']} x {d['actors']} actor(s)")
    say(f"  layers: {len(d['layers'])} ({_names(d['layers'])})")
    say(f"  units: {d['units']:,}   presets: {', '.join(d['presets']) or 'none'}   images: {d['images']:,}")
    say("  shards: " + ", ".join(f"{k} {v:,}" + (f" ({done[k]:,} done)" if done.get(k) else "")
                                 for k, v in sh.items()))
    say(f"  objects: {sum(o.values()):,}, {_mib(sum(b.values()))} estimated")
    for kind in o:
        say(f"    {kind:9s} {o[kind]:>10,}  {_mib(b.get(kind, 0)):>12}")
    load = f", machine load: CPU work x{d['slowdown']:g}" if d.get("slowdown", 1) > 1 else ""
    say(f"  time estimate ({d['costs']}{load}):")
    for phase, s in sec.items():
        say(f"    {phase:21s} {s:>10,.1f} s")
    if done:
        say("  (an existing store: a re-run skips the finished shards; the estimate is for a fresh build)")


def run(args) -> int:
    import json

    from deepvis.cluster.build import run_build

    from deepvis.cli import log

    def say(message: str) -> None:
        # --json: stdout holds the JSON alone, so the build's messages go to stderr (-q still silences them)
        if log.isEnabledFor(logging.INFO):
            print(message, file=sys.stderr, flush=True)
    summary = run_build(config_from_args(args), log=say if getattr(args, "json", False) else log.info)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=1, default=str))
    elif summary.get("dry_run"):
        print_dry_run(summary)
    else:
        print_summary(summary)
    return 0 if summary.get("dry_run") or summary["status"] == "complete" else 1
