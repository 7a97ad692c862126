"""Measure natural images' statistics that tasks/ needs and write tasks/data/natural_spectrum.npz:
  magnitude           (3, 224, 113) mean |rfft2| (norm="ortho") of ImageNet photos, centre crop 224,
                      in the decorrelated colour space of tasks.param (MaCo's fixed magnitude)
  hf_fraction_median  the median over the photos of tasks.quality.hf_fraction (the reference of the
                      high-frequency metric)
    python scripts/natural_spectrum.py [IMAGE_FOLDER]     (default ../shared/datasets/imagenet-sample)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from deepvis.tasks.param import correlate
    from deepvis.tasks.preprocess import crop_input
    from deepvis.tasks.quality import hf_fraction

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "datasets" / "imagenet-sample"
    files = sorted(folder.rglob("*.JPEG"))
    if not files:
        sys.exit(f"no .JPEG images under {folder}")
    pre = {"resize": 256, "crop": 224, "interpolation": "bilinear"}
    total, fracs = None, []
    for f in files:
        with Image.open(f) as im:
            x = TF.to_tensor(crop_input(im, pre)).double()[None]          # (1, 3, 224, 224) in [0, 1]
        fracs.append(float(hf_fraction(x)[0]))
        mag = torch.fft.rfft2(correlate(x - 0.5), norm="ortho").abs()[0]
        total = mag if total is None else total + mag
    mean = (total / len(files)).numpy().astype(np.float32)
    out = ROOT / "tasks" / "data" / "natural_spectrum.npz"
    np.savez_compressed(out, magnitude=mean, hf_fraction_median=np.float64(np.median(fracs)),
                        images=np.int64(len(files)))
    print(f"wrote {out}: {len(files)} images, median high-frequency fraction {np.median(fracs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
