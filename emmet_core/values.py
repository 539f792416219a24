"""Target values v*: one batched optimisation of a vector δ per fact (REFERENCE §3).

δ_i is added at the subject's last token of every prompt of fact i, either to the MLP
output of the edited layer (ROME) or to the residual output of the last edited layer
(MEMIT/EMMET). All facts of a batch share every forward pass; each fact has its own
loss, its own early stop and its own norm clamp, so the result is the same as
optimising the facts one by one. Layers below the insertion point never see δ: their
output is computed once and replayed each step. Once at most half of a pass's facts are
still optimising (early stop), the pass drops the rows of the stopped ones (their δ and
losses are final), so a step costs what the facts still moving need.

With ``precision="bfloat16"`` (or ``"tf32"``) everything the steps build on (the prefix cache, the
reference pass at δ = 0) runs at the steps' precision too, so the KL term starts at
exactly zero; only v_init, which v* = v_init + δ is built from, comes from a float32
pass over the plain prompts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from .errors import require_finite
from .hooks import add_at_positions, capture_output, reuse_lower_layers, select_rows
from .keys import encode_in_template, module_outputs
from .models import LoadedModel
from .passes import PassSizer
from .precision import check_precision, tf32_matmuls
from .request import EditRequest
from .tokens import check_length, encode_with_subject, target_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    steps: int = 25  # v_num_grad_steps
    lr: float = 0.5  # v_lr
    weight_decay: float = 0.5  # v_weight_decay
    clamp: float = 0.75  # clamp_norm_factor, ‖δ‖ ≤ clamp·‖v_init‖
    kl_factor: float = 0.0625
    stop_loss: float = 0.05
    seed: int = 0  # δ starts at zero; the seed is recorded for completeness
    # Prompt rows per pass (a fact has one per template plus its KL prompt). None sizes the
    # passes (passes.PassSizer): on a CPU 128 rows, the measured best on 2 cores
    # (smollm2-135m, bf16: EMMET 0.92 s per fact at 84 rows vs 1.04 at 224; ROME 2.8 s at
    # 132 rows vs 3.2 at 352); on CUDA as many as fit the free memory.
    rows_per_pass: int | None = None
    precision: str = "float32"  # "tf32" (CUDA tensor cores) or "bfloat16" (autocast): see precision.py
    # "loss": stop a fact when its loss is below stop_loss; "most_probable" (ENCORE's MPES):
    # also as soon as each of its target tokens is the most probable one on every prompt.
    early_stop: str = "loss"
    # With "most_probable": steps a fact goes on once its targets lead (0: stop at once).
    # A few more steps widen the lead, which the paraphrases need.
    stop_patience: int = 0


# The ValueResult fields that hold one row per fact (everything but ``steps``).
PER_FACT = ("values", "v_init", "loss_before", "nll_after", "loss_after")


@dataclass
class ValueResult:
    values: torch.Tensor  # (N, d) v* = v_init + δ
    v_init: torch.Tensor  # (N, d)
    loss_before: torch.Tensor  # (N,) target NLL at δ = 0
    nll_after: torch.Tensor  # (N,) target NLL at the final δ
    loss_after: torch.Tensor  # (N,) total loss (NLL + KL + decay) at the final δ
    steps: int  # optimiser updates made
    cached: int = 0  # facts whose row came from the disk cache (value_cache), not optimised now


@dataclass
class _Rows:
    """Which fact each row is and where its target tokens sit, on one device: the steps
    read them where the hidden states or logits are (with a device map, the insertion
    layer, the final norm and the unembedding can each sit on another device)."""

    fact: torch.Tensor  # (B,) which fact each row belongs to
    tgt_row: torch.Tensor  # flat over all target tokens: row
    tgt_col: torch.Tensor  # ... suffix column whose logits predict the token
    tgt_id: torch.Tensor  # ... the token
    tgt_fact: torch.Tensor  # ... the fact it belongs to
    tgt_weight: torch.Tensor  # ... 1 / (tokens of that target · prompts of that fact)
    kl_rows: torch.Tensor  # row of each fact's "{subject} is a" prompt (of the facts in the batch)
    kl_fact: torch.Tensor  # ... and which fact it is


@dataclass
class _Batch:
    """Rows split at the subject's last token: a left-padded prefix that δ cannot
    influence (run once, kept as a KV cache) and a right-padded suffix that starts at
    the subject's last token (run every step). δ therefore sits at suffix column 0.
    The token tensors live on the model's input device; :meth:`on` gives the indices."""

    prefix_ids: torch.Tensor  # (B, P)
    prefix_pos: torch.Tensor  # (B, P) position ids
    suffix_ids: torch.Tensor  # (B, S)
    suffix_pos: torch.Tensor  # (B, S)
    mask: torch.Tensor  # (B, P + S) attention mask over prefix and suffix
    index: dict[str, list]  # the _Rows fields as Python lists
    _copies: dict[torch.device, _Rows] = field(default_factory=dict)

    def on(self, device: torch.device) -> _Rows:
        """The row indices on ``device``, copied there once."""
        if device not in self._copies:
            self._copies[device] = _Rows(**{
                name: torch.tensor(values, dtype=torch.float32 if name == "tgt_weight" else torch.long, device=device)
                for name, values in self.index.items()})
        return self._copies[device]

    @property
    def facts(self) -> list[int]:
        """The facts that have rows in this batch."""
        return self.index["kl_fact"]

    def rows_of(self, facts: set[int]) -> list[int]:
        return [row for row, fact in enumerate(self.index["fact"]) if fact in facts]

    def select(self, rows: list[int]) -> _Batch:
        """The batch of ``rows`` only (every row of a fact, as :meth:`rows_of` gives them);
        facts keep their numbers."""
        new = {old: i for i, old in enumerate(rows)}
        index = self.index
        targets = [k for k, row in enumerate(index["tgt_row"]) if row in new]
        kl = [k for k, row in enumerate(index["kl_rows"]) if row in new]
        picked = {
            "fact": [index["fact"][row] for row in rows],
            "tgt_row": [new[index["tgt_row"][k]] for k in targets],
            **{name: [index[name][k] for k in targets] for name in ("tgt_col", "tgt_id", "tgt_fact", "tgt_weight")},
            "kl_rows": [new[index["kl_rows"][k]] for k in kl],
            "kl_fact": [index["kl_fact"][k] for k in kl],
        }
        at = torch.tensor(rows, device=self.suffix_ids.device)
        return _Batch(self.prefix_ids[at], self.prefix_pos[at], self.suffix_ids[at], self.suffix_pos[at],
                      self.mask[at], picked)


def _build(loaded: LoadedModel, requests: list[EditRequest], templates: list[str]) -> _Batch:
    tok = loaded.tokenizer
    rows, cuts, fact = [], [], []
    t_row, t_col, t_id, t_fact, t_w = [], [], [], [], []
    for i, request in enumerate(requests):
        target = target_ids(tok, request.target_new)
        for template in templates:
            ids, last = encode_in_template(tok, template, request)
            for j, token in enumerate(target):
                t_row.append(len(rows))
                t_col.append(len(ids) - 1 + j - last)
                t_id.append(token)
                t_fact.append(i)
                t_w.append(1.0 / (len(target) * len(templates)))
            rows.append(ids + target[:-1])
            cuts.append(last)
            fact.append(i)
    kl_rows = []
    for i, request in enumerate(requests):
        ids, last = encode_with_subject(tok, f"{request.subject} is a", (0, len(request.subject)))
        kl_rows.append(len(rows))
        rows.append(ids)
        cuts.append(last)
        fact.append(i)
    check_length(rows, loaded.adapter.context_length(), "an edit prompt with its target")
    width_p = max(cuts)
    width_s = max(len(row) - cut for row, cut in zip(rows, cuts))
    pad = tok.pad_token_id
    prefix, prefix_pos, suffix, suffix_pos, mask = [], [], [], [], []
    for row, cut in zip(rows, cuts):
        tail = len(row) - cut
        prefix.append([pad] * (width_p - cut) + row[:cut])
        prefix_pos.append([0] * (width_p - cut) + list(range(cut)))
        suffix.append(row[cut:] + [pad] * (width_s - tail))
        suffix_pos.append(list(range(cut, cut + width_s)))
        mask.append([0] * (width_p - cut) + [1] * len(row) + [0] * (width_s - tail))

    def t(values: list) -> torch.Tensor:  # one copy per tensor, straight to the device
        return torch.tensor(values, dtype=torch.long, device=loaded.device).reshape(len(rows), -1)

    index = {"fact": fact, "tgt_row": t_row, "tgt_col": t_col, "tgt_id": t_id, "tgt_fact": t_fact,
             "tgt_weight": t_w, "kl_rows": kl_rows, "kl_fact": list(range(len(requests)))}
    return _Batch(t(prefix), t(prefix_pos), t(suffix), t(suffix_pos), t(mask), index)


@torch.no_grad()
def _prefix_cache(loaded: LoadedModel, batch: _Batch):
    """KV cache of the δ-independent prefixes (None when every prefix is empty)."""
    width_p = batch.prefix_ids.shape[1]
    if width_p == 0:
        return None
    return loaded.adapter.run_body(batch.prefix_ids, batch.mask[:, :width_p], batch.prefix_pos)[1]


@contextmanager
def _precision(loaded: LoadedModel, precision: str, modules: list[torch.nn.Module]) -> Iterator[None]:
    """Run the optimisation steps at ``precision`` (:mod:`precision`). For bfloat16,
    ``modules`` (the layers the steps run through) compute with bfloat16 copies of their
    matrices, and on a CPU attention switches to the eager kernel meanwhile: the fused bf16
    attention backward is slower there than everything else together."""
    check_precision(precision, "value_precision")
    if precision == "float32":
        yield
        return
    if precision == "tf32":
        with tf32_matmuls():
            yield
        return
    model = loaded.model
    previous = model.config._attn_implementation
    swap = loaded.device.type == "cpu" and previous != "eager" and hasattr(model, "set_attn_implementation")
    if swap:
        model.set_attn_implementation("eager")
    try:
        matrices = _bf16_matrices([*modules, loaded.adapter.unembed])
        with torch.autocast(loaded.device.type, dtype=torch.bfloat16), matrices:
            yield
    finally:
        if swap:
            model.set_attn_implementation(previous)


@contextmanager
def _bf16_matrices(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Stand a bfloat16 copy in for every float32 matrix of ``modules`` meanwhile.

    Autocast casts each matrix to bfloat16 on every use (it keeps casts only of weights
    that require grad), so over 25 steps the casts cost a third of the time. The copies
    hold exactly what autocast would compute; the original parameters are put back
    untouched. Embeddings keep theirs: a tied unembedding gets a copy of its own.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in modules:
            for owner in module.modules():
                if isinstance(owner, torch.nn.Embedding):
                    continue
                for name, param in list(owner.named_parameters(recurse=False)):
                    if param.ndim == 2 and param.dtype == torch.float32:
                        swapped.append((owner, name, param))
                        setattr(owner, name, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
        yield
    finally:
        for owner, name, param in reversed(swapped):
            setattr(owner, name, param)


def _losses(loaded: LoadedModel, batch: _Batch, n: int, cache, kl_init: torch.Tensor | None):
    """Per-fact target NLL, KL(now ‖ init) and how many target tokens are not yet the most
    probable one (over all the fact's prompts), plus the current KL log-probs. One entry
    for each of the ``n`` facts; zero for a fact without rows in ``batch``."""
    adapter = loaded.adapter
    past = copy.deepcopy(cache) if cache is not None else None  # each step extends its own copy
    hidden, _ = adapter.run_body(batch.suffix_ids, batch.mask, batch.suffix_pos, past)
    at_hidden = batch.on(hidden.device)
    logp = adapter.logits(hidden[at_hidden.tgt_row, at_hidden.tgt_col]).float().log_softmax(-1)
    at_logits = batch.on(logp.device)
    token_nll = -logp.gather(1, at_logits.tgt_id[:, None])[:, 0] * at_logits.tgt_weight
    nll = torch.zeros(n, dtype=token_nll.dtype, device=logp.device).index_add(0, at_logits.tgt_fact, token_nll)
    wrong = (logp.detach().argmax(-1) != at_logits.tgt_id).to(token_nll.dtype)
    misses = torch.zeros_like(nll).index_add(0, at_logits.tgt_fact, wrong)
    kl_logp = adapter.logits(hidden[at_hidden.kl_rows, 0]).float().log_softmax(-1)
    if kl_init is None:
        return nll, torch.zeros_like(nll), misses, kl_logp
    kl_fact = batch.on(kl_logp.device).kl_fact
    kl_each = (kl_logp.exp() * (kl_logp - kl_init[kl_fact])).sum(-1)
    kl = torch.zeros_like(nll).index_add(0, kl_fact.to(nll.device), kl_each.to(nll.dtype))
    return nll, kl, misses, kl_logp


StepCallback = Callable[[int, int, int], object]  # (step, steps, facts still optimising)


def compute_values(
    loaded: LoadedModel,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    site: str,
    config: ValueConfig,
    progress: Callable[[int], object] | None = None,
    on_step: StepCallback | None = None,
) -> ValueResult:
    """Optimise δ for every fact; ``site`` is "mlp" (ROME) or "residual" (MEMIT/EMMET).

    Facts are optimised together in passes sized by :class:`passes.PassSizer`; since each
    fact has its own loss, the grouping does not change the result. Facts with equally
    long suffixes (tokens from the subject's last one to the end of the target) share a
    pass, so that little of it is padding; results come back in request order.
    ``progress(k)`` is called as each pass of k facts is done; ``on_step(step, steps,
    optimising)`` after every optimisation step (how many facts have not stopped yet).
    """
    sizer = PassSizer(len(templates) + 1, _devices(loaded), config.rows_per_pass)
    lengths = [_suffix_tokens(loaded, r) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: lengths[i])
    parts: list[ValueResult] = []
    done = 0
    while done < len(order):
        chunk = order[done : done + sizer.next_size([lengths[i] for i in order[done:]])]
        part = sizer.run(lambda chunk=chunk: _optimise(loaded, [requests[i] for i in chunk], templates, layer,
                                                       site, config, on_step), len(chunk), lengths[chunk[-1]])
        if part is None:  # out of memory: the sizer halved its passes, try again
            continue
        parts.append(part)
        done += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if len(parts) == 1 and order == sorted(order):
        return parts[0]
    back = [0] * len(order)
    for position, index in enumerate(order):
        back[index] = position
    where = torch.tensor(back, device=parts[0].values.device)
    joined = {name: torch.cat([getattr(p, name) for p in parts])[where] for name in PER_FACT}
    return ValueResult(**joined, steps=max(p.steps for p in parts))


def _devices(loaded: LoadedModel) -> list[torch.device]:
    """Every device the model's weights occupy (one, unless a device map spreads them)."""
    return list(dict.fromkeys(p.device for p in loaded.model.parameters() if p.device.type != "meta"))


def _suffix_tokens(loaded: LoadedModel, request: EditRequest) -> int:
    """Tokens a fact's rows run through every step: from the subject's last token to the
    target's second-to-last (measured on the plain prompt)."""
    ids, last = encode_in_template(loaded.tokenizer, "{}", request)
    return len(ids) - last + len(target_ids(loaded.tokenizer, request.target_new)) - 1


def _optimise(
    loaded: LoadedModel,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    site: str,
    config: ValueConfig,
    on_step: StepCallback | None = None,
) -> ValueResult:
    adapter, n = loaded.adapter, len(requests)
    batch = _build(loaded, requests, templates)
    module = adapter.mlp_out(layer) if site == "mlp" else adapter.layer(layer)
    upto = layer if site == "mlp" else layer + 1  # first layer that depends on δ
    v_init = module_outputs(loaded, requests, module).float()  # float32 whatever the step precision
    require_finite(v_init, f"the activations at layer {layer}")
    with _precision(loaded, config.precision, list(adapter.layers[upto:])):
        with torch.no_grad():  # δ-independent work, once: prefix cache, KL reference, lower-layer replay
            cache = _prefix_cache(loaded, batch)
            with capture_output(adapter.layers[max(upto - 1, 0)]) as low:
                nll0, _, _, kl_init = _losses(loaded, batch, n, cache, None)
            require_finite(nll0, "the target loss")
        return _steps(loaded, batch, module, upto, low[0] if upto > 0 else None, cache, v_init, nll0, kl_init,
                      config, on_step)


def drops_rows(optimising: int, facts: int) -> bool:
    """Whether a pass of ``facts`` facts goes on with the rows of the ``optimising`` ones
    only: once the stopped ones are half of it or more."""
    return 0 < optimising and 2 * optimising <= facts


def _steps(loaded: LoadedModel, batch: _Batch, module: torch.nn.Module, upto: int, low, cache,
           v_init: torch.Tensor, nll0: torch.Tensor, kl_init: torch.Tensor, config: ValueConfig,
           on_step: StepCallback | None = None) -> ValueResult:
    """Adam on δ (one row per fact) with per-fact early stop and norm clamp. ``low``: the
    output of the layer below ``upto`` (replayed every step; None when ``upto`` is 0).

    A stopped fact's δ is frozen, and no other fact's δ reaches its rows, so its losses
    are final: once they are half the batch or more, the steps go on without its rows."""
    n = len(v_init)
    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    max_norm = config.clamp * v_init.norm(dim=1)
    active = torch.ones(n, dtype=torch.bool, device=delta.device)
    leading = torch.zeros(n, dtype=torch.long, device=delta.device)  # steps each fact's targets have led in a row
    final_nll = nll0.detach().to(delta.device)
    final_loss = torch.zeros_like(final_nll)
    debug = log.isEnabledFor(logging.DEBUG)  # reading the losses back waits for the device
    step = 0
    while True:  # one round per set of rows
        fact = batch.on(delta.device).fact  # δ is added where the insertion module runs
        rows = torch.arange(len(fact), device=delta.device)
        present = torch.zeros(n, dtype=torch.bool, device=delta.device).index_fill(0, fact, True)
        replay = reuse_lower_layers(loaded.adapter.layers, upto, low) if low is not None else nullcontext()
        with replay, add_at_positions(module, rows, torch.zeros_like(rows), lambda fact=fact: delta[fact]):
            while True:  # the last pass only scores the final δ
                nll, kl, misses, _ = _losses(loaded, batch, n, cache, kl_init)
                decay = config.weight_decay * delta.norm(dim=1) / v_init.norm(dim=1) ** 2
                loss = (nll + config.kl_factor * kl).to(delta.device) + decay
                final_nll = torch.where(present, nll.detach().to(delta.device), final_nll)
                final_loss = torch.where(present, loss.detach(), final_loss)
                active &= loss.detach() >= config.stop_loss
                if config.early_stop == "most_probable":  # ENCORE's MPES: the target leads on every prompt
                    leads = misses.to(delta.device) == 0
                    leading = torch.where(leads, leading + 1, 0)
                    active &= leading <= config.stop_patience
                if debug:
                    log.debug("step %d loss %s", step, loss.detach().tolist())
                optimising = int(active.sum())  # the one read-back a step needs
                if on_step is not None:
                    on_step(step, config.steps, optimising)
                if step == config.steps or not optimising:
                    return ValueResult(v_init + delta.detach(), v_init, nll0.detach().to(delta.device), final_nll,
                                       final_loss, step)
                frozen = delta.detach().clone()
                optimizer.zero_grad()
                # Masks by multiplying, not indexing: the same gradients, no wait for the device.
                (loss * active).sum().backward()
                optimizer.step()
                with torch.no_grad():
                    delta.copy_(torch.where(active[:, None], delta, frozen))
                    scale = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    delta.mul_(scale[:, None])
                step += 1
                if drops_rows(optimising, len(batch.facts)):
                    break
        kept = batch.rows_of(set(active.nonzero()[:, 0].tolist()))
        batch = batch.select(kept)
        cache = loaded.adapter.select_cache_rows(cache, kept) if cache is not None else None
        low = select_rows(low, kept) if low is not None else None
