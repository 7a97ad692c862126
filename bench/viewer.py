"""Viewer benchmark: how fast a layer page of N units loads from `deepvis serve`, in headless Chromium.

Writes a synthetic atlas (the test suite's, devtools/viewer.py: a layer of N units with
32 px optimized images, two presets), publishes the viewer (timed), serves it with `deepvis serve`'s
server and opens `#/layer/conv.1` in a cold browser context R times, reading the page's own marks:

  first screen  navigation start -> every tile of the first 1280x800 screen drawn
  all tiles     navigation start -> all N tiles drawn (a viewport tall enough to show them all)
  requests      image requests of the page (resource timing entries ending .png/.jpg)

    .venv/bin/python bench/viewer.py [--units 1024] [--repeat 5] [--json]

Needs Chromium at /usr/bin/chromium (apt-get install chromium) and `pip install playwright`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.viewer import BIG, launch_chromium, make_synthetic_atlas, serve  # noqa: E402

IMAGE_EXT = (".png", ".jpg", ".jpeg")


def measure(browser, url: str, height: int) -> dict:
    ctx = browser.new_context(viewport={"width": 1280, "height": height})
    pg = ctx.new_page()
    try:
        pg.goto(url)
        pg.wait_for_selector("#grid[data-visible-ms]", timeout=30000)
        first = int(pg.get_attribute("#grid", "data-visible-ms"))
        out = {"first_screen_ms": first}
        if height > 800:
            pg.wait_for_selector("#grid[data-ready-ms]", timeout=30000)
            out["all_tiles_ms"] = int(pg.get_attribute("#grid", "data-ready-ms"))
        names = pg.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
        out["image_requests"] = sum(1 for n in names if n.split("?")[0].lower().endswith(IMAGE_EXT))
        out["requests"] = len(names) + 1
        out["bytes"] = pg.evaluate("() => performance.getEntriesByType('resource')"
                                   ".reduce((a, e) => a + (e.transferSize || 0), 0)")
        return out
    finally:
        ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from deepvis.atlas_viewer.publish import publish

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        facts = make_synthetic_atlas(Path(tmp) / "atlas", big_units=args.units)
        t0 = time.perf_counter()
        publish(facts["store"])
        publish_s = time.perf_counter() - t0
        srv = serve(facts["store"])
        try:
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                url = srv.url(f"#/layer/{BIG}")
                measure(browser, url, 800)                      # warm up the server and the browser binary
                screens = [measure(browser, url, 800) for _ in range(args.repeat)]
                fulls = [measure(browser, url, 20000) for _ in range(args.repeat)]
                browser.close()
        finally:
            srv.stop()
    res = {
        "units": args.units, "repeat": args.repeat, "publish_s": round(publish_s, 2),
        "first_screen_ms_median": statistics.median(r["first_screen_ms"] for r in screens),
        "first_screen_ms_max": max(r["first_screen_ms"] for r in screens),
        "all_tiles_ms_median": statistics.median(r["all_tiles_ms"] for r in fulls),
        "all_tiles_ms_max": max(r["all_tiles_ms"] for r in fulls),
        "image_requests_first_screen": screens[0]["image_requests"],
        "image_requests_all_tiles": fulls[0]["image_requests"],
        "requests_all_tiles": fulls[0]["requests"],
        "transfer_kib_all_tiles": round(fulls[0]["bytes"] / 1024),
        "load_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"layer of {res['units']} units, {args.repeat} cold loads each, {res['cpus']} CPUs, "
          f"load {res['load_before_after'][0]} -> {res['load_before_after'][1]}; publish {res['publish_s']} s")
    print("| measure | median ms | max ms | image requests |")
    print("|---|---|---|---|")
    print(f"| first screen (1280x800) | {res['first_screen_ms_median']} | {res['first_screen_ms_max']} | "
          f"{res['image_requests_first_screen']} |")
    print(f"| all {res['units']} tiles | {res['all_tiles_ms_median']} | {res['all_tiles_ms_max']} | "
          f"{res['image_requests_all_tiles']} |")
    print(f"all tiles: {res['requests_all_tiles']} requests in all (page, script, style, 2 JSON, sheets), "
          f"{res['transfer_kib_all_tiles']} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
