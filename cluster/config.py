"""The build job's one typed config. A TOML file (`--config`) and the command-line flags set the same
keys; flags win. Unknown keys are rejected with the list of known ones."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields

from deepvis.tasks.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
DECODERS = ("pil", "torchvision", "nvjpeg")   # the dataset pass's decoders (cluster.decode)


@dataclass
class BuildConfig:
    model: str = "efficientnet_lite0"
    weights: str | None = None          # None: the model's trained weights; "none": random; or a path
    layers: str = "all"                 # comma-separated names or globs
    units: str | None = None            # "a:b" slice of every selected layer (None: all units)
    presets: str = "yosinski-3"         # comma-separated preset names, "all", or "none"
    presets_file: str | None = None     # extra presets (TOML/JSON)
    diversity: int = 1                  # images per (unit, modern preset), pushed apart (Lucid's diversity)
    diversity_layer: str | None = None  # the layer whose Gram matrices are compared (default: the unit's)
    steps: int | None = None            # override the presets' step counts
    size: int | None = None             # override the optimization image size
    dataset: str | None = None          # image folder / list file; None: no dataset pass
    k: int = 9                          # top-k and bottom-k per unit
    out: str = "atlas"                  # the store: a directory or s3://bucket/prefix
    endpoint_url: str | None = None     # S3-compatible server (MinIO, SeaweedFS, R2...); else AWS_ENDPOINT_URL
    address: str | None = None          # None: start a local Ray cluster; "auto" or ray://host:port
    actors: int | None = None           # None: one per GPU, else one per CPU core
    device: str | None = None           # None: cuda when the actor has a GPU, else cpu
    shard_units: int | None = None      # units per optimization shard (None: sized for the device)
    shard_images: int | None = None     # most images per dataset shard (None: the device's, see build.CPU_SHARD_IMAGES)
    batch_size: int | None = None       # images per forward in the dataset pass (None: the device's, see build.CPU_BATCH)
    precision: str = "fp32"             # fp32 | bf16 | fp16: autocast of both passes (GPU; see validate)
    decoder: str = "pil"                # pil | torchvision | nvjpeg: the dataset pass's JPEG decoder
    max_attempts: int = 3               # a shard failing this often is reported as failed
    actor_timeout: int = 300            # seconds before unplaced actors are reported (none placed: error)
    progress: bool = True
    force: bool = False                 # take over another build's lease (see cluster/lease.py)
    dry_run: bool = False               # print the plan, counts and a time estimate; compute and write nothing

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, origin: str = "config") -> "BuildConfig":
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)} in {origin}; known keys: {', '.join(cls.keys())}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_toml(cls, path: str, overrides: dict | None = None) -> "BuildConfig":
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file not found: {path!r}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path!r} is not valid TOML: {e}") from None
        if "build" in d:  # a [build] table, or bare keys; never both, and no other table is ignored
            others = sorted(k for k in d if k != "build")
            if others:
                raise UserError(f"config file {path!r} has {', '.join(others)} outside its [build] table, and "
                                f"they would be ignored; move every key into [build]")
            d = d["build"]
            if not isinstance(d, dict):
                raise UserError(f"config file {path!r}: 'build' must be a table ([build]), got {d!r}")
        return cls.from_dict({**d, **(overrides or {})}, origin=path)

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = f.type if isinstance(f.type, str) else str(f.type)
            if v is None:
                continue
            if want.startswith("int") and (not isinstance(v, int) or isinstance(v, bool)):
                raise UserError(f"{f.name} must be an integer, got {v!r}")
            if want.startswith("str") and not isinstance(v, str):
                raise UserError(f"{f.name} must be a string, got {v!r}")
            if want.startswith("bool") and not isinstance(v, bool):
                raise UserError(f"{f.name} must be true or false, got {v!r}")
        for name in ("steps", "size", "k", "actors", "shard_units", "shard_images", "batch_size", "max_attempts",
                     "diversity", "actor_timeout"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        if self.size is not None and self.size < 16:
            raise UserError(f"size must be at least 16 pixels, got {self.size}")
        for name, allowed in (("precision", PRECISIONS), ("decoder", DECODERS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.precision != "fp32" and self.device == "cpu":
            raise UserError(f"--precision {self.precision} needs a GPU (on CPU it is slower than fp32 and "
                            f"disagrees more, see BENCHMARKS.md); use --precision fp32 or --device cuda")
        if self.decoder == "nvjpeg" and self.device == "cpu":
            raise UserError("--decoder nvjpeg decodes on the actors' GPUs and --device cpu has none; "
                            "use --decoder pil (or torchvision) on CPU actors")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """to_dict() fit to write into the atlas or a log: no user:secret@ or ?query of any address
        (an --endpoint-url may carry credentials)."""
        from deepvis.storage.s3 import redact_url
        return {k: redact_url(v) if isinstance(v, str) and "://" in v else v for k, v in self.to_dict().items()}


def parse_units(spec: str | None, n: int, layer: str, clamp: bool = False) -> list[int]:
    """'a:b' (python slice, either side optional) or 'i' or 'a,b,c' -> unit list within 0..n-1.
    A range past the layer's end is an error (it says what exists), unless clamp (a range applied to
    several layers of different widths, checked against the widest one: see make_plan)."""
    if spec in (None, "", "all", ":"):
        return list(range(n))
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            lo, hi = int(a) if a else 0, int(b) if b else n
            if lo < 0 or lo >= n or hi <= lo or (hi > n and not clamp):
                raise IndexError
            return list(range(lo, min(hi, n)))
        units = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--units {spec!r} is not a range like 0:64 or a list like 1,5,9") from None
    except IndexError:
        raise UserError(f"--units {spec!r} is beyond layer {layer!r}, which has {n} units (0..{n - 1})") from None
    bad = [u for u in units if not 0 <= u < n]
    if bad or not units:
        raise UserError(f"--units {spec!r} is beyond layer {layer!r}, which has {n} units (0..{n - 1})")
    return units
