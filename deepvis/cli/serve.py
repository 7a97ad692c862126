"""`deepvis serve STORE`: browse an atlas locally. The server is deepvis.atlas_viewer.server."""
from __future__ import annotations

import argparse

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
    ds = p.add_mutually_exclusive_group()
    ds.add_argument("--dataset", metavar="DIR", default=None,
                    help="serve the source images of the top/bottom-k rows under /dataset/ from DIR (the "
                         "dataset the atlas was built from). Off by default: an atlas must not choose "
                         "which of your files are served")
    ds.add_argument("--dataset-from-manifest", action="store_true",
                    help="serve them from the directory the atlas's manifest names (printed at start); "
                         "only for atlases you trust")
    ds.add_argument("--no-dataset", action="store_true", help=argparse.SUPPRESS)   # the default now
    p.add_argument("--publish", action="store_true",
                   help="(re)write the viewer and its data into the atlas before serving")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return p


def run(args) -> int:
    from deepvis.atlas_viewer.server import (INDEX, check_port, listen_error, make_server, serve_until_interrupted,
                                             server_url)
    from deepvis.storage import layout
    from deepvis.storage.store import open_store

    check_port(args.port)
    store = open_store(args.store, args.endpoint_url, must_exist=True)  # never creates a directory
    manifest = layout.read_manifest(store)  # a clear error when STORE holds no atlas
    dataset, note = _dataset_root(args, manifest)
    try:   # bind first: a port in use is reported before anything is written into the atlas
        server = make_server(store, args.host, args.port, dataset=dataset, verbose=args.verbose)
    except OSError as e:
        raise listen_error(args.host, args.port, e) from None
    try:
        _publish_if_needed(store, args.publish)
    except BaseException:
        server.server_close()
        raise
    url = server_url(server, INDEX)
    print(f"serving the atlas {store.uri} at {url}", flush=True)
    if note:
        print(note, flush=True)
    serve_until_interrupted(server, url, "browse the atlas", args.open)
    return 0


def _dataset_root(args, manifest: dict) -> tuple[str | None, str | None]:
    """(the directory to serve /dataset/ from or None, a line to print). Only the user turns it on."""
    from deepvis.atlas_viewer.server import manifest_dataset_root
    from deepvis.storage.datasets import dataset_root

    named = manifest_dataset_root(manifest)
    if args.dataset:
        root = dataset_root(args.dataset)          # StoreError (exit 2) when it does not exist
        return root, f"serving the dataset's source images from {root}"
    if args.dataset_from_manifest:
        if named is None:
            uri = (manifest.get("dataset") or {}).get("uri")
            raise UserError(f"the atlas names no local dataset directory that exists (its dataset: {uri!r}); "
                            f"pass --dataset DIR")
        return named, f"serving the dataset's source images from {named} (the directory the atlas's manifest names)"
    if named is not None:
        return None, (f"note: the atlas was built from {named}; its source images are not served "
                      f"(pass --dataset DIR, or --dataset-from-manifest for an atlas you trust)")
    return None, None


def _publish_if_needed(store, force: bool) -> None:
    if force or not store.exists("viewer/data/model.json") or not store.exists("viewer/index.html"):
        from deepvis.atlas_viewer.publish import publish
        try:
            publish(store)
            print(f"wrote the viewer into the atlas ({store.uri}/viewer/)", flush=True)
        except Exception as e:
            raise UserError(f"the atlas has no viewer and it cannot be written there ({e}); "
                            f"copy the atlas to a directory and serve that") from None
