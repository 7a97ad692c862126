"""Command-line arguments shared by several subcommands."""

ENDPOINT_HELP = ("S3 endpoint for S3-compatible servers (MinIO, SeaweedFS, Ceph, R2); "
                 "default: AWS_ENDPOINT_URL or AWS itself")


def add_store_args(p) -> None:
    """STORE (a directory or s3://bucket/prefix) and --endpoint-url."""
    p.add_argument("store", help="the atlas: a directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
