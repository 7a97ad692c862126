"""`deepvis live --model M [--atlas STORE]`: live activations of webcam, video and images in the
browser. The server and its page live in deepvis.atlas_viewer.live."""
from __future__ import annotations

from deepvis.cli.args import ENDPOINT_HELP


def add_parser(sub):
    from deepvis.cli.layers import add_model_args

    p = sub.add_parser("live", help="live activations of webcam, video and images in the browser",
                       description="Start a local web app that shows, live, what MODEL computes on "
                                   "your webcam, a local video file or dropped images: the top-5 "
                                   "classes, one layer's activations as a grid of per-channel tiles, "
                                   "the selected unit's map and its gradient with respect to the frame. "
                                   "With --atlas (an atlas of the same model) a clicked unit also shows "
                                   "its optimized images and top dataset crops. Open the printed URL.")
    p.add_argument("--model", required=True,
                   help="model spec: efficientnet_lite0 (offline), torchvision:<name> or package.module:callable")
    add_model_args(p)
    p.add_argument("--atlas", default=None, help="an atlas of the same model (directory or s3://bucket/prefix)")
    p.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
    p.add_argument("--layer", default=None, help="the layer shown first (default: a middle layer)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; browsers allow the "
                        "webcam only on localhost or https)")
    p.add_argument("--port", type=int, default=8001, help="TCP port (default 8001; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted frame or image upload, in MB (default 20)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return p


def run(args) -> int:
    from deepvis.cli.args import resolve_device
    from deepvis.atlas_viewer.live.server import bind_server
    from deepvis.atlas_viewer.server import check_port, listen_error
    from deepvis.storage.store import open_store
    from deepvis.tasks.errors import UserError

    if not args.max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    check_port(args.port)
    device = resolve_device(args.device)
    store = open_store(args.atlas, args.endpoint_url) if args.atlas else None
    try:   # bind before the model loads: a port in use is reported at once, not after the load
        server = bind_server(args.host, args.port)
    except OSError as e:
        raise listen_error(args.host, args.port, e) from None
    try:
        _start(server, args, store, device)
    finally:
        server.server_close()
    return 0


def _start(server, args, store, device: str) -> None:
    """Load the model into the bound server and serve until Ctrl-C."""
    from deepvis.atlas_viewer.live.server import attach
    from deepvis.atlas_viewer.server import serve_until_interrupted, server_url
    from deepvis.tasks.models import load_model

    lm = load_model(args.model, args.weights, device=device)
    attach(server, lm, store, args.layer, int(args.max_upload_mb * 1e6), device, args.verbose)
    live = server.RequestHandlerClass.live
    url = server_url(server, "/")
    print(f"live activations of {lm.name} on {device} at {url}", flush=True)
    if live.atlas is not None:
        print(f"atlas: {live.atlas.store.uri}" + (f" ({live.atlas.reason})" if live.atlas.reason else ""), flush=True)
    serve_until_interrupted(server, url, "send frames; browsers allow the webcam only on localhost or https",
                            args.open, stopped=lambda: f"stopped after {live.frames} frames")
