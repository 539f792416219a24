"""Architecture adapter: the only place that knows module names and weight layouts.

Each family is a :class:`ModelSpec` keyed by ``config.model_type``. Everything else in
the library asks the adapter for "the edited projection of layer l", "the output of
layer l", "the final norm", "the unembedding" and never spells a module path itself.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelSpec:
    """Where the edit-relevant modules live in one model family."""

    layers: str  # ModuleList of transformer blocks
    mlp_out: str  # the edited matrix W: maps the MLP hidden k (d_k) to the residual (d)
    final_norm: str  # applied to the last layer output before the unembedding
    body: str  # the decoder without its head (returns last_hidden_state, normed)
    # A norm applied to the MLP output before it joins the residual stream (Gemma 2/3,
    # OLMo 2). There W k does not add linearly to the residual, so values are optimised
    # at the MLP output and one edit cannot be spread over several layers.
    post_mlp_norm: str | None = None
    # The unembedding is asked of the model (get_output_embeddings): its name changed
    # across transformers versions (GPT-NeoX: embed_out -> lm_head).


_GPT2 = ModelSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "transformer")
_GPTJ = ModelSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "transformer")
_NEOX = ModelSpec("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "gpt_neox")
_LLAMA_LIKE = ModelSpec("model.layers", "mlp.down_proj", "model.norm", "model")
_SANDWICH = ModelSpec("model.layers", "mlp.down_proj", "model.norm", "model", "post_feedforward_layernorm")

SPECS: dict[str, ModelSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA_LIKE,  # also SmolLM / SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "smollm3": _LLAMA_LIKE,
    "olmo2": _SANDWICH,
}


class ModelAdapter:
    """Typed access to the edit-relevant parts of one loaded causal LM."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SPECS:
            raise UnsupportedModelError(
                f"model family {model_type!r} is not supported; supported: "
                f"{', '.join(sorted(SPECS))}. A new family needs its decoder layer list, "
                "MLP output projection, final norm and unembedding registered in "
                "emmet_core.adapter.SPECS"
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = SPECS[model_type]
        self.layers: nn.ModuleList = model.get_submodule(self.spec.layers)
        self.num_layers = len(self.layers)

    # -- modules ---------------------------------------------------------------------------
    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise UnsupportedModelError(
                f"layer {layer!r} is out of range: this model has layers 0..{self.num_layers - 1}"
            )

    def layer(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return self.layers[layer]

    def mlp_out(self, layer: int) -> nn.Module:
        return self.layer(layer).get_submodule(self.spec.mlp_out)

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{layer}.{self.spec.mlp_out}"

    @property
    def body(self) -> nn.Module:
        return self.model.get_submodule(self.spec.body)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # -- the edited matrix -----------------------------------------------------------------
    def transposed(self, layer: int) -> bool:
        """GPT-2's Conv1D stores its weight as (in, out); the layout comes from the class."""
        return type(self.mlp_out(layer)).__name__ == "Conv1D"

    def weight(self, layer: int) -> torch.Tensor:
        """The stored parameter of W (in its own layout)."""
        return self.mlp_out(layer).weight

    def matrix(self, layer: int) -> torch.Tensor:
        """W as a (d, d_k) matrix view: output = W k + b."""
        weight = self.weight(layer)
        return weight.T if self.transposed(layer) else weight

    def device(self, layer: int) -> torch.device:
        """Where W of ``layer`` lives: its keys, values, C0 and Δ are made there. A layer a
        device map offloads (weights on 'meta', loaded for each forward) cannot be edited."""
        device = self.weight(layer).device
        if device.type == "meta":
            raise UnsupportedModelError(
                f"layer {layer} is offloaded by the device map (its weights are loaded only for each "
                "forward pass), so it cannot be edited in place; give it a device in device_map"
            )
        return device

    def input_device(self) -> torch.device:
        """Where token ids go: where the input embedding computes. With a device map that
        is its entry in ``hf_device_map``; an embedding offloaded to the CPU or disk
        computes on the map's first accelerator, as accelerate runs it."""
        embedding = self.model.get_input_embeddings()
        placement = getattr(self.model, "hf_device_map", None)
        if not placement:
            return embedding.weight.device
        name = next(n for n, m in self.model.named_modules() if m is embedding)
        owners = [key for key in placement if key == "" or name == key or name.startswith(key + ".")]
        where = placement[max(owners, key=len)] if owners else "cpu"
        if where in ("cpu", "disk"):
            where = next((d for d in placement.values() if d not in ("cpu", "disk")), "cpu")
        return torch.device(f"cuda:{where}" if isinstance(where, int) else where)

    def key_size(self, layer: int) -> int:
        return self.matrix(layer).shape[1]

    def hidden_size(self) -> int:
        return self.matrix(0).shape[0]

    def project(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """W k + b for keys of shape (d_k, N), in float64: the current output of W."""
        module = self.mlp_out(layer)
        matrix = self.matrix(layer).detach().to(torch.float64)
        out = matrix @ keys.to(matrix.device, torch.float64)
        bias = getattr(module, "bias", None)
        if bias is not None:
            out = out + bias.detach().to(torch.float64)[:, None]
        return out

    # -- running the decoder -----------------------------------------------------------------
    def run_body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 past: object | None = None) -> tuple[torch.Tensor, object]:
        """Final (normed) hidden states and the KV cache that now ends with these tokens.
        ``past`` (a cache from an earlier call, which grows in place) continues a text."""
        body = self.body
        # transformers renamed the cache argument ``past_key_values`` -> ``cache``.
        name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        extra = {name: past} if past is not None else {}
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **extra)
        cache = getattr(out, "cache", None) or out.past_key_values
        if past is None:  # left pads attend to nothing and may hold NaN: zero them (always masked)
            for layer in getattr(cache, "layers", []):
                for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(tensor, torch.Tensor):
                        tensor.nan_to_num_(0.0)
        return out[0], cache

    @staticmethod
    def select_cache_rows(cache: object, rows: list[int]) -> object:
        """A copy of a KV cache from :meth:`run_body` that holds only ``rows`` of its batch."""
        picked = copy.deepcopy(cache)
        picked.batch_select_indices(torch.tensor(rows))  # CPU indices select on any device
        return picked

    # -- logits ----------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final (already normed) hidden states."""
        logits = self.unembed(hidden)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    def context_length(self) -> int | None:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None
