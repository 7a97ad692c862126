"""`deepvis serve STORE`: browse an atlas locally. The server is deepvis.atlas_viewer.server."""
from __future__ import annotations

from deepvis.cli.args import add_store_args
from deepvis.tasks.errors import UserError


def add_parser(sub):
    p = sub.add_parser("serve", help="browse an atlas in a web browser (local HTTP server)",
                       description="Serve the atlas at STORE (a directory, or s3://bucket/prefix proxied "
                                   "object by object) with its static viewer, for local browsing: "
                                   "open the printed URL. Nothing is written while serving; an atlas "
                                   "without a viewer (built before the viewer existed) gets one first.")
    add_store_args(p)
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the atlas "
                        "to the network)")
    p.add_argument("--open", action="store_true", help="open the viewer in the default web browser")
    p.add_argument("--no-dataset", action="store_true",
                   help="do not serve the dataset's source images under /dataset/")
    p.add_argument("--publish", action="store_true",
                   help="(re)write the viewer and its data into the atlas before serving")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return p


def run(args) -> int:
    from deepvis.atlas_viewer.server import INDEX, listen_error, make_server, serve_until_interrupted, server_url
    from deepvis.storage import layout
    from deepvis.storage.store import open_store

    store = open_store(args.store, args.endpoint_url, must_exist=True)  # never creates a directory
    layout.read_manifest(store)  # a clear error when STORE holds no atlas
    if args.publish or not store.exists("viewer/data/model.json") or not store.exists("viewer/index.html"):
        from deepvis.atlas_viewer.publish import publish
        try:
            publish(store)
            print(f"wrote the viewer into the atlas ({store.uri}/viewer/)", flush=True)
        except Exception as e:
            raise UserError(f"the atlas has no viewer and it cannot be written there ({e}); "
                            f"copy the atlas to a directory and serve that") from None
    try:
        server = make_server(store, args.host, args.port, dataset=not args.no_dataset, verbose=args.verbose)
    except OSError as e:
        raise listen_error(args.host, args.port, e) from None
    url = server_url(server, INDEX)
    print(f"serving the atlas {store.uri} at {url}", flush=True)
    serve_until_interrupted(server, url, "browse the atlas", args.open)
    return 0
