"""Capture layer outputs with forward hooks, stopping the forward pass after the last one needed.

The hooks are always removed on exit (a long-lived worker renders thousands of units; leaked hooks
would keep every activation alive)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from deepvis.tasks.errors import UserError


class _StopForward(Exception):
    pass


def as_module(model) -> nn.Module:
    """An nn.Module, or a tasks.models.LoadedModel (its .module)."""
    return model if isinstance(model, nn.Module) else model.module


def get_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(f"unknown layer {name!r}; run `deepvis layers MODEL` to list the layers") from None


@contextmanager
def hooked(model: nn.Module, names: Iterable[str], on_output: Callable[[str, torch.Tensor], None] | None = None):
    """Within the block, `run(x)` forwards x and returns {name: output} for the hooked layers
    (or calls on_output(name, output) instead of storing, when given). The forward stops as soon
    as every hooked layer has fired: the rest of the network is never computed."""
    names = list(dict.fromkeys(names))
    outputs: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def make_hook(name):
        def hook(_module, _inputs, output):
            if name not in pending:      # a module called twice: the first call counts
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if on_output is not None:
                on_output(name, output)
            else:
                outputs[name] = output
            pending.discard(name)
            if not pending:
                raise _StopForward
        return hook

    handles = [get_layer(model, n).register_forward_hook(make_hook(n)) for n in names]

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs.clear()
        pending.clear()
        pending.update(names)
        try:
            model(x)
        except _StopForward:
            pass
        if pending:
            raise RuntimeError(f"layers {sorted(pending)} did not fire during the forward pass")
        return dict(outputs)

    try:
        yield run
    finally:
        for h in handles:
            h.remove()
