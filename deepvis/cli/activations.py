"""`deepvis activations --model M INPUT --layer L [-o OUT]`: one layer's activations of each input
image as a grid of per-channel tiles (tasks.grid: row-major, one normalisation for the whole layer,
separators of grey 64), written as an 8-bit grayscale PNG per image.

INPUT is an image file, a video file (one PNG per frame; needs PyAV: `pip install av`) or a folder
of those (not recursive; other files are skipped). Outputs: OUT/<stem>.png, OUT/<stem>-<frame:05d>.png
for video frames."""
from __future__ import annotations

from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


def add_parser(sub):
    from deepvis.cli.layers import add_model_args

    p = sub.add_parser("activations", help="render one layer's activations of images as tile grids",
                       description="Forward each input image through MODEL and write the output of "
                                   "LAYER as a PNG grid: one tile per channel in row-major order, "
                                   "ceil(sqrt(C)) columns, one min..max normalisation for the whole "
                                   "layer (so tiles compare), grey separators. INPUT is an image, a "
                                   "video (one PNG per frame; needs `pip install av`) or a folder of "
                                   "them. Writes OUT/<stem>.png or OUT/<stem>-<frame>.png.")
    p.add_argument("input", help="an image file, a video file or a folder of images/videos")
    p.add_argument("--model", required=True,
                   help="model spec: efficientnet_lite0 (offline), torchvision:<name> or package.module:callable")
    add_model_args(p)
    p.add_argument("--layer", required=True,
                   help="the layer's exact name, as listed by `deepvis layers MODEL`")
    p.add_argument("-o", "--out", default=".", help="output folder (created if missing; default: .)")
    p.add_argument("--scale", type=int, default=1,
                   help="integer nearest-neighbour upscaling of each tile (default: 1)")
    p.add_argument("--cols", type=int, default=None, help="tiles per row (default: ceil(sqrt(channels)))")
    p.add_argument("--sep", type=int, default=1, help="separator width in pixels (default: 1)")
    return p


def _inputs(path: Path) -> list[Path]:
    from deepvis.tasks.errors import UserError

    if path.is_dir():
        files = sorted(f for f in path.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
        if not files:
            raise UserError(f"folder {str(path)!r} holds no image or video files "
                            f"({', '.join(sorted(IMAGE_EXTS))}, ...)")
        return files
    if not path.exists():
        raise UserError(f"input not found: {str(path)!r}; pass an image file, a video file or a folder")
    return [path]


def _open_image(path: Path):
    """storage.images, the decoder the build and `live` use (RGB, bombs refused from the header)."""
    from deepvis.storage.images import BadImage, open_image
    from deepvis.tasks.errors import UserError

    try:
        return open_image(path)
    except BadImage as e:
        raise UserError(f"cannot read {str(path)!r} as an image ({e}); pass a JPEG/PNG/... "
                        f"image, a video file or a folder of them") from None


def _video_frames(path: Path):
    """Yield (index, PIL image) of every frame, via PyAV."""
    from deepvis.tasks.errors import UserError

    try:
        import av  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UserError(f"{str(path)!r} is a video; reading video needs PyAV: `pip install av`") from None
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                yield i, frame.to_image()
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise UserError(f"cannot decode video {str(path)!r} ({e})") from None


def run(args) -> int:
    from PIL import Image

    from deepvis.tasks.errors import UserError
    from deepvis.tasks.grid import grid_shape, layer_activations, tile_grid
    from deepvis.tasks.hooks import get_layer
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import preprocess

    if args.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {args.scale}")
    if args.sep < 0:
        raise UserError(f"--sep must be >= 0, got {args.sep}")
    if args.cols is not None and args.cols < 1:
        raise UserError(f"--cols must be a positive integer, got {args.cols}")
    files = _inputs(Path(args.input))
    lm = load_model(args.model, args.weights)
    get_layer(lm.module, args.layer)  # unknown layer -> UserError before any work
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {str(out_dir)!r} ({e.strerror})") from None

    def frames():
        for f in files:
            if f.suffix.lower() in VIDEO_EXTS:
                for i, img in _video_frames(f):
                    yield f, out_dir / f"{f.stem}-{i:05d}.png", img
            else:
                yield f, out_dir / f"{f.stem}.png", _open_image(f)

    written = 0
    for src, dst, img in frames():
        acts = layer_activations(lm.module, args.layer, preprocess(img, lm.preprocessing))
        if acts.dim() not in (1, 3):
            raise UserError(f"layer {args.layer!r} outputs shape {tuple(acts.shape)} per image; "
                            f"a grid needs C x H x W or C")
        grid = tile_grid(acts, cols=args.cols, sep=args.sep, scale=args.scale)
        Image.fromarray(grid, "L").save(dst)
        rows, cols = grid_shape(acts.shape[0], args.cols)
        print(f"wrote {dst} ({grid.shape[1]}x{grid.shape[0]}: {acts.shape[0]} channels of "
              f"{'x'.join(map(str, acts.shape[1:])) or '1x1'} as {rows}x{cols} tiles) from {src}")
        written += 1
    if not written:
        raise UserError(f"no frames decoded from {args.input!r}")
    return 0
