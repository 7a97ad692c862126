"""Command-line arguments shared by several subcommands."""

ENDPOINT_HELP = ("S3 endpoint for S3-compatible servers (MinIO, SeaweedFS, Ceph, R2); "
                 "default: AWS_ENDPOINT_URL or AWS itself")


def add_store_args(p) -> None:
    """STORE (a directory or s3://bucket/prefix) and --endpoint-url."""
    p.add_argument("store", help="the atlas: a directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)


def resolve_device(spec: str | None) -> str:
    """A --device value: None or "auto" -> cuda when available, else cpu; an unknown name, or cuda
    where there is none -> UserError (one line)."""
    import torch

    from deepvis.tasks.errors import UserError

    if spec in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for but CUDA is not available; use --device cpu")
    return str(dev)
