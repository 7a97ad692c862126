"""Frames per second of `deepvis live`, end to end over HTTP, against the bare model forward.

A client sends 224x224 JPEG frames (a real ImageNet photo) one after another on one keep-alive
connection, like the page does (the next frame only after the previous answer), and decodes each
answer's JSON and grid PNG. Per layer: frames/s end to end, the server's own split (decode, model,
encode) and, measured in the same run on the same frame, the bare `model(x)` forward (no hooks, no
HTTP) as the baseline. The target is >= 5 frames/s on a 2-core CPU with the offline model.

    python bench/live.py [--frames 40] [--write]      # --write: replace the section in BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
LAYERS = ["_conv_stem", "_blocks.1", "_blocks.8", "_blocks.15", "_fc"]
HEADING = "## Live activations"


def frame_jpeg() -> bytes:
    from PIL import Image

    from deepvis.tasks.preprocess import crop_input
    f = sorted(SAMPLE.glob("*/*.JPEG"))[0]
    with Image.open(f) as im:
        frame = crop_input(im, {"resize": 224, "crop": 224, "interpolation": "bilinear"})
    buf = io.BytesIO()
    frame.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args()
    from PIL import Image

    from deepvis.atlas_viewer.live.server import make_server
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import preprocess

    lm = load_model("efficientnet_lite0")
    body = frame_jpeg()
    x = preprocess(Image.open(io.BytesIO(body)), lm.preprocessing)[None]
    server = make_server(lm, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    load_before = os.getloadavg()[0]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    rows = [_measure_layer(conn, layer, body, args.frames, lambda: _bare_ms(lm, x, 10)) for layer in LAYERS]
    conn.close()
    server.shutdown()
    text = _report(rows, args.frames, len(body), (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        from bench.benchmd import replace_section
        replace_section(ROOT / "BENCHMARKS.md", HEADING, text)
    return 0


def _bare_ms(lm, x, n: int) -> float:
    """Median ms of the bare model(x), after one warm-up call."""
    import torch

    with torch.no_grad():
        lm.module(x)
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            lm.module(x)
            t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def _measure_layer(conn, layer: str, body: bytes, frames: int, bare_ms) -> dict:
    """Frames/s of one layer end to end, the server's split, one gradient request, the bare forward."""
    from PIL import Image

    def one():
        conn.request("POST", f"/api/frame?layer={layer}&unit=0&client=bench", body=body)
        d = json.loads(conn.getresponse().read())
        Image.open(io.BytesIO(base64.b64decode(d["grid"].split(",", 1)[1]))).load()
        return d
    for _ in range(3):
        d = one()
    t0 = time.perf_counter()
    splits = [one()["ms"] for _ in range(frames)]
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(5):
        conn.request("POST", f"/api/gradient?layer={layer}&unit=0", body=body)
        conn.getresponse().read()
    grad_ms = (time.perf_counter() - t1) / 5 * 1e3
    return {"layer": layer, "shape": "×".join(map(str, d["shape"])),
            "grid": f"{d['rows']}×{d['cols']}", "fps": frames / wall, "ms": wall / frames * 1e3,
            "model": statistics.median(s["model"] for s in splits),
            "decode": statistics.median(s["decode"] for s in splits),
            "encode": statistics.median(s["encode"] for s in splits),
            "bare": bare_ms(), "grad": grad_ms}


def _report(rows: list[dict], frames: int, body_bytes: int, loads: tuple[float, float]) -> str:
    import torch

    lines = [HEADING, "",
             f"`bench/live.py` ({dt.date.today()}): `deepvis live`'s server with the offline model "
             f"(efficientnet_lite0, CPU), {frames} frames per layer sent one after another on one "
             f"keep-alive HTTP connection, each a {body_bytes // 1024} KiB 224×224 JPEG of a real ImageNet "
             f"photo; the client parses each answer and decodes its grid PNG, as the page does. *bare "
             f"forward* = `model(x)` on the same frame in the same run (the baseline: no HTTP, no hooks, no "
             f"grid). Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average (1 min) "
             f"{loads[0]:.1f} → {loads[1]:.1f}. Target: ≥ 5 frames/s.", "",
             "| layer | output | grid | frames/s end to end | ms/frame | server: decode / model / encode ms "
             "| bare forward ms | gradient request ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['layer']}` | {r['shape']} | {r['grid']} | **{r['fps']:.1f}** | {r['ms']:.0f} | "
                     f"{r['decode']:.1f} / {r['model']:.1f} / {r['encode']:.1f} | {r['bare']:.1f} | {r['grad']:.0f} |")
    lines += ["", "*model* is the hooked full forward plus the grid (the top-5 needs the logits, so every "
              "frame runs the whole network whatever the layer); the rest of a frame is JPEG decode, PNG "
              "encode of the grid and HTTP. The browser adds its own capture and drawing (about 13 frames/s "
              "measured in the Playwright test on this machine, with Chromium on the same 2 CPUs). *gradient request*: "
              "the unit's gradient with respect to the frame, one HTTP request; its forward stops at the layer, so "
              "early layers cost a few ms (with a full forward it was 42–76 ms for every layer, same machine)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
