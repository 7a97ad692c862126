import pytest
import torch
from torch import nn

from deepvis.tasks.errors import UserError
from deepvis.tasks.hooks import hooked
from deepvis.tasks.layers import resolve_layers
from deepvis.tasks.models import load_model


def _forward_order_reference(model, input_size):
    """Independent reference: every Conv2d/Linear and every non-container composite module, in the order
    their forward hooks fire, with the output shapes."""
    seen = []
    handles = []
    for name, m in model.named_modules():
        composite = name and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and len(list(m.children()))
        if isinstance(m, (nn.Conv2d, nn.Linear)) or composite:
            handles.append(m.register_forward_hook(lambda _m, _i, o, n=name: seen.append((n, tuple(o.shape[1:])))))
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:alexnet", "torchvision:googlenet"])
def test_enumeration_matches_module_tree(spec):
    lm = load_model(spec, weights="none")
    infos = resolve_layers(lm.module, 224, None)
    ref = _forward_order_reference(lm.module, 224)
    assert [(i.name, i.shape) for i in infos] == [(n, s) for n, s in ref if len(s) in (1, 3)]
    for i in infos:
        assert i.units == i.shape[0]
        kind = type(lm.module.get_submodule(i.name))
        assert i.kind == ("conv" if issubclass(kind, nn.Conv2d) else "linear" if issubclass(kind, nn.Linear) else "block")


def test_lite0_thousands_of_units(lite0):
    infos = resolve_layers(lite0.module, 224, None)
    assert sum(i.units for i in infos) > 5000
    assert infos[0].name == "_conv_stem" and infos[0].shape == (32, 112, 112)
    assert infos[-1].name == "_fc" and infos[-1].shape == (1000,) and infos[-1].kind == "linear"
    assert "_blocks.3" in [i.name for i in infos]


def test_selection_by_names_and_globs(lite0):
    infos = resolve_layers(lite0.module, 224, "_fc,_blocks.1*")
    names = [i.name for i in infos]
    assert names[-1] == "_fc"
    assert all(n == "_fc" or n.startswith("_blocks.1") for n in names)
    assert "_blocks.15" in names and "_blocks.1._expand_conv" in names
    # exact names may pick modules outside the default set (here an activation)
    relu = resolve_layers(load_model("torchvision:alexnet", weights="none").module, 224, "features.1")
    assert [(i.name, i.kind, i.shape) for i in relu] == [("features.1", "relu", (64, 55, 55))]


def test_unknown_layer_clear_error(lite0):
    with pytest.raises(UserError, match="unknown layer 'nope'"):
        resolve_layers(lite0.module, 224, "nope")
    with pytest.raises(UserError, match="matches no layer"):
        resolve_layers(lite0.module, 224, "zzz*")


def test_hooked_stops_forward_and_removes_hooks(lite0):
    calls = []
    h = lite0.module._fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        with hooked(lite0.module, ["_blocks.2"]) as run:
            out = run(torch.zeros(2, 3, 64, 64))
        assert out["_blocks.2"].shape[:2] == (2, 24)
        assert calls == []  # the forward stopped at the target layer
    finally:
        h.remove()
    assert all(len(m._forward_hooks) == 0 for m in lite0.module.modules())
