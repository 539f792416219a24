"""Keys k*: the input of the edited matrix W at the subject's last token, averaged over
context templates (REFERENCE §2). Only the layers up to the one read are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import require_finite
from .hooks import capture_inputs, capture_output, hidden_of, run_until
from .models import LoadedModel
from .request import EditRequest, fill
from .tokens import check_length, encode_with_subject, pad_rows


def encode_in_template(tokenizer, template: str, request: EditRequest) -> tuple[list[int], int]:
    """Token ids of the request's prompt placed in a context template, and the index of
    the subject's last token."""
    offset = template.index("{}")
    start, end = request.subject_span
    return encode_with_subject(tokenizer, fill(template, request.text), (offset + start, offset + end))


def subject_rows(
    loaded: LoadedModel, requests: list[EditRequest], templates: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Tokenise every (request, template) pair, request-major; return ids and the
    index of the subject's last token in each row."""
    rows, positions = [], []
    for request in requests:
        for template in templates:
            ids, last = encode_in_template(loaded.tokenizer, template, request)
            rows.append(ids)
            positions.append(last)
    check_length(rows, loaded.adapter.context_length(), "an edit prompt with its context")
    return rows, positions


@torch.no_grad()
def _gather(
    loaded: LoadedModel,
    rows: list[list[int]],
    positions: list[int],
    read: Callable[[torch.nn.Module], tuple],
    module: torch.nn.Module,
    batch_size: int | None,
) -> torch.Tensor:
    """Run row batches until ``module``; return ``read``'s vector at each position.
    Rows per forward: 64 on a CPU, 512 on a GPU (no gradients are kept, so memory is small)."""
    pad = loaded.tokenizer.pad_token_id
    batch_size = batch_size or (512 if loaded.device.type == "cuda" else 64)
    out = []
    for first in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[first : first + batch_size], pad, loaded.device)
        with read(module) as captured:
            run_until(module, loaded.model, input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = captured[0] if isinstance(captured, dict) else hidden_of(captured[0])
        index = torch.tensor(positions[first : first + batch_size], device=hidden.device)
        out.append(hidden[torch.arange(len(index), device=hidden.device), index].float())
    return torch.cat(out)


def _inputs(module: torch.nn.Module):
    return capture_inputs({0: module})


def compute_keys(
    loaded: LoadedModel,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    mode: str = "mean",
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged keys (d_k, N) and plain-prompt keys (d_k, N) at ``layer``.

    ``templates[0]`` must be the plain ``"{}"``. ``mode="mean"`` (ROME) averages all
    templates equally; ``mode="half"`` (MEMIT/EMMET) takes ½·plain + ½·mean(prefixed).
    """
    rows, positions = subject_rows(loaded, requests, templates)
    module = loaded.adapter.mlp_out(layer)
    keys = _gather(loaded, rows, positions, _inputs, module, batch_size)
    require_finite(keys, f"the keys at layer {layer}")
    keys = keys.view(len(requests), len(templates), -1)
    plain = keys[:, 0]
    if mode == "mean" or len(templates) == 1:
        averaged = keys.mean(1)
    elif mode == "half":
        averaged = 0.5 * plain + 0.5 * keys[:, 1:].mean(1)
    else:
        raise ValueError(f"unknown key mode {mode!r}")
    return averaged.T.contiguous(), plain.T.contiguous()


def layer_outputs(
    loaded: LoadedModel, requests: list[EditRequest], layer: int, batch_size: int | None = None
) -> torch.Tensor:
    """Residual-stream output of ``layer`` at the subject's last token of the plain
    prompt, (d, N): the "z" that MEMIT/EMMET spread over the edited layers."""
    return module_outputs(loaded, requests, loaded.adapter.layer(layer), batch_size).T.contiguous()


def module_outputs(
    loaded: LoadedModel, requests: list[EditRequest], module: torch.nn.Module, batch_size: int | None = None
) -> torch.Tensor:
    """Output of ``module`` at the subject's last token of each plain prompt, (N, d),
    in the model's own precision."""
    rows, positions = subject_rows(loaded, requests, ["{}"])
    return _gather(loaded, rows, positions, capture_output, module, batch_size)
