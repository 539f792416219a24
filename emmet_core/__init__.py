"""emmet_core: edit facts inside causal language models with ROME, MEMIT and EMMET.

    from emmet_core import load_model, Editor
    loaded = load_model("smollm2-135m")               # offline default
    editor = Editor(loaded)
    result = editor.apply([{"prompt": "The mother tongue of {} is",
                            "subject": "Danielle Darrieux", "target_new": "English"}], "rome")
    editor.undo()                                     # weights restored bit for bit

Heavy modules (torch, transformers) load on first use of a name below.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "LoadedModel": "models",
    "ALIASES": "models",
    "DEFAULT_MODEL": "models",
    "ModelAdapter": "adapter",
    "Editor": "editor",
    "EditResult": "editor",
    "EditRequest": "request",
    "HParams": "hparams",
    "load_preset": "hparams",
    "layer_covariances": "stats",
    "score_targets": "readout",
    "generate": "readout",
    "rome_update": "solvers",
    "memit_update": "solvers",
    "emmet_update": "solvers",
    "EditError": "errors",
    "InvalidRequestError": "errors",
    "UnsupportedModelError": "errors",
    "NumericalError": "errors",
    "StatsCacheError": "errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'emmet_core' has no attribute {name!r}")
