"""Forward-hook context managers. Each registers on enter and removes in ``finally``.

Layer outputs are a tensor in some transformers versions and a tuple whose first item is
the hidden state in others; every hook here accepts both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by :func:`stop_after` to abandon a forward pass once the needed layer ran."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def capture_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the first positional input of each module (e.g. the MLP hidden k of W)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for key, module in modules.items():

            def hook(_module: nn.Module, args: tuple, key: int = key) -> None:
                captured[key] = args[0]

            handles.append(module.register_forward_pre_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Any]]:
    """Record the raw output object of a module (one item per call)."""
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort the forward pass right after ``module`` ran: later layers are never computed."""

    def hook(_module: nn.Module, _args: tuple, _out: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(module: nn.Module, forward: Callable[..., Any], **inputs: Any) -> None:
    """Run ``forward(**inputs)`` but stop as soon as ``module`` has produced its output."""
    with stop_after(module):
        try:
            forward(**inputs)
        except StopForward:
            pass


@contextmanager
def add_at_positions(
    module: nn.Module, rows: torch.Tensor, cols: torch.Tensor, vectors: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Add ``vectors()[i]`` to the module's hidden output at (rows[i], cols[i]).

    ``vectors`` is called on every forward so autograd sees a fresh graph each step.
    Out of place, so a recorded output reused by :func:`reuse_lower_layers` stays clean.
    """

    def hook(_module: nn.Module, _args: tuple, out: Any) -> Any:
        hidden = _hidden(out)
        added = torch.zeros_like(hidden).index_put((rows, cols), vectors().to(hidden.dtype))
        return _replace_hidden(out, hidden + added)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def select_rows(output: Any, rows: list[int]) -> Any:
    """A recorded layer output for some of its batch rows (what :func:`reuse_lower_layers`
    replays once a pass has dropped rows)."""
    hidden = _hidden(output)
    return _replace_hidden(output, hidden[torch.tensor(rows, device=hidden.device)])


@contextmanager
def reuse_lower_layers(layers: nn.ModuleList, upto: int, recorded: Any) -> Iterator[None]:
    """Make layers ``0..upto-1`` return ``recorded`` (the output of layer ``upto-1``).

    Valid only while the inputs are those that produced ``recorded``: the value
    optimisation feeds the same batch every step and changes nothing below ``upto``,
    so the lower layers' work is done once instead of once per step.
    """
    patched = list(layers)[:upto]
    # A forward set on the instance (accelerate's device-map hook wraps it so) is put back.
    saved = [layer.__dict__.get("forward") for layer in patched]
    try:
        for layer in patched:
            layer.forward = lambda *args, **kwargs: recorded
        yield
    finally:
        for layer, forward in zip(patched, saved):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a layer output (tensor or tuple)."""
    return _hidden(output)
