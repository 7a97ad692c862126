"""`deepvis demo`: a small atlas on the embedded defaults (local Ray, local directory, offline model)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("deepvis.demo")   # through the `deepvis` logger: -q silences the chatter

SHARED_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "imagenet-sample"


def add_parser(sub):
    p = sub.add_parser("demo", help="build a small demo atlas offline and say how to look at it",
                       description="Build a small atlas of the offline efficientnet_lite0 on a local Ray "
                                   "cluster into ./atlas: 3 layers x 8 units, short optimization at 96 px, "
                                   "and a top-k pass over ../shared/datasets/imagenet-sample when present "
                                   "(else scikit-image's bundled photos).")
    p.add_argument("--out", default="atlas", help="where to write the atlas (default: ./atlas)")
    p.add_argument("--dataset", default=None, help="image folder (default: see above)")
    return p


def bundled_photos(dest: Path) -> Path:
    """Write scikit-image's bundled photos as JPEGs into dest (a fallback dataset)."""
    from PIL import Image

    from deepvis.tasks.errors import UserError
    try:
        from skimage import data
    except ImportError:  # the `demo` extra is optional: say how to get it, or how to do without it
        raise UserError(f"no sample images at {SHARED_SAMPLE} and scikit-image is not installed for the "
                        f"fallback photos; pip install 'deepvis-atlas[demo]' or pass --dataset DIR") from None

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry"):
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 - some need optional downloads
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        Image.fromarray(arr).convert("RGB").save(dest / f"{name}.jpg", quality=92)
    return dest


def run(args) -> int:
    from deepvis.cluster.build import run_build
    from deepvis.cli.build import print_summary
    from deepvis.cluster.config import BuildConfig

    dataset = args.dataset
    if dataset is None:
        dataset = str(SHARED_SAMPLE) if SHARED_SAMPLE.is_dir() else str(bundled_photos(Path(args.out + "-photos")))
    log.info(f"demo: efficientnet_lite0, dataset {dataset}, atlas -> {os.path.abspath(args.out)}")
    cfg = BuildConfig(layers="_conv_stem,_blocks.5,_fc", units="0:8", presets="yosinski-3", steps=60, size=96,
                      dataset=dataset, out=args.out)
    summary = run_build(cfg)
    print_summary(summary)
    log.info(f"\nThe atlas is in {summary['atlas']}:\n"
          f"  deepvis serve {args.out}      (then open http://127.0.0.1:8000/)\n"
          f"  deepvis status {args.out}\n"
          f"  deepvis query {args.out} --layer _fc --unit 1\n"
          f"  images: {summary['atlas']}/units/<layer>/<unit>/yosinski-3.png; dataset inputs: "
          f"{summary['atlas']}/inputs/ (index/topk.parquet names each row's, and its crop's box)")
    return 0 if summary["status"] == "complete" else 1
