"""Counted FLOPs per sample of each training method, on the device and on the server.

The count is analytic: it reads the shapes from a transformers config (``model_type`` "llama",
"gemma3_text" or "gpt2") and never builds a model. It is the contract below, nothing measured.

Methods and where their work runs (L blocks, split k, LoRA of rank r on the ``lora_targets``):

* ``splitfrozen``: device = forward of blocks 0..k-1 without LoRA, no backward. Server = forward and
  backward of blocks k..L-1 with LoRA and of the classification head.
* ``splitlora``: LoRA on every block. Device = blocks 0..k-1: forward, then backward from the
  cut-layer gradient the server returns. Server = blocks k..L-1 and the head, forward and backward,
  including the input gradient of block k that it sends back.
* ``fedlora``: the device trains the whole model (LoRA on every block, the head); the server only
  averages, which counts 0 per sample.
* ``ffa``: FFA-LoRA, as ``fedlora`` with the LoRA A factors frozen (only B and the head train).
* ``centralized``: the ``fedlora`` computation, run on the server; device 0.

The split matters only to ``splitfrozen`` and ``splitlora`` (1 <= k <= L-1); the others ignore it.

Formulas (per token unless said otherwise; in, out: a weight's input and output widths):

* Forward GEMM: 2·in·out (one multiply-add = 2 FLOPs).
* Input gradient of a GEMM: 2·in·out, counted iff some trainable parameter lies strictly before the
  GEMM on the forward path. Positions are (block, stage) in forward order; GEMMs of one stage run in
  parallel on the same input, so they do not count as "before" each other. Embeddings are frozen, so
  the first stage of block 0 never needs it, while the stage after a trained one always does.
* Weight gradient of a GEMM: 2·in·out, iff that weight is trained (only the head's is; every
  pretrained block weight stays frozen).
* LoRA on a frozen GEMM, y = W·x + B·A·x with h = A·x (A: in->r, B: r->out):
  forward 2·r·(in+out); dB = g·hᵀ: 2·r·out iff B trains; dh = Bᵀ·g: 2·r·out iff A trains or the input
  gradient is needed; dA = dh·xᵀ: 2·r·in iff A trains; dx += Aᵀ·dh: 2·r·in iff the input gradient is
  needed. With both factors trained and the input gradient needed this is 2·r·(in+out) of weight
  gradients plus 2·r·(in+out) on the input-gradient path. Where the input gradient is not needed but
  A trains (the first stage of the first trained block), dh is still computed, for dA alone; it is
  counted, so freezing A (``ffa``) saves exactly dA everywhere plus dh there.
* Attention, per block and per sample of T real tokens, causal: QKᵀ costs 2·d_head·n_heads·T(T+1)/2
  and the weighted sum AV the same; a sliding-window block (Gemma 3's ``sliding_attention``, window W:
  query i sees keys i-W+1..i) counts Σ_i min(i+1, W) pairs instead of T(T+1)/2. Its backward costs
  twice its forward, counted iff a trainable parameter lies before it (in an earlier block, or on the
  projections that feed it). Twice is exact when the gradient must reach q, k and v alike (default
  targets, or any trained block below); with LoRA on v alone in the first trained block, autograd needs only dV = Pᵀ·dO and the count is an
  upper bound there.
* Classification head ``score`` (H, C): applied to one token per sample (the last real one), so its
  forward, weight gradient and input gradient cost 2·H·C per sample each.
* Ignored, being O(T·H) or less: norms (the final one included, trained or not), activations,
  softmax, rotary and position embeddings, embedding lookups, residual adds, biases, dropout, the
  LoRA scaling, the optimizer step.

The tests check the totals against torch's FlopCounterMode over real autograd steps of tiny models
(attention there spans all T² pairs, causal masking saves no work in eager attention).

GEMMs are linear in T and attention quadratic; a sample's count is the sum over its tokens, and the
reported number is the mean per sample over the given lengths.

Per-block GEMM inventory (stage in brackets; attention is stage 1):
llama and gemma3_text: q_proj, k_proj, v_proj [0], o_proj [2], gate_proj, up_proj [3], down_proj [4]
(Gemma 3's extra norms, query/key norms included, are norms: ignored);
gpt2: attn.c_attn [0], attn.c_proj [2], mlp.c_fc [3], mlp.c_proj [4].
A LoRA target matches a module whose name within the block equals it or ends with "." + it, as peft
matches: gpt2's "c_proj" names both attn.c_proj and mlp.c_proj.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

METHODS: tuple[str, ...] = ("splitfrozen", "splitlora", "fedlora", "ffa", "centralized")
SPLIT_METHODS: tuple[str, ...] = ("splitfrozen", "splitlora")
#: Stage of the attention scores and weighted sum inside a block (between the projections that feed it
#: and the output projection).
ATTENTION_STAGE = 1
#: Name of the classification head in ``LlamaForSequenceClassification`` and ``GPT2ForSequenceClassification``.
HEAD_NAME = "score"

Side = Literal["device", "server"]
Phase = Literal["forward", "backward"]


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a block: its module name within the block, its widths and its stage."""

    name: str
    in_features: int
    out_features: int
    #: Forward order within the block; GEMMs of one stage read the same input in parallel.
    stage: int


@dataclass(frozen=True)
class FlopTerm:
    """One counted term, as a mean per sample.

    ``kind`` is one of: forward "gemm", "lora", "attention", "head"; backward "input_grad",
    "weight_grad" (the head's), "lora_b_grad", "lora_h_grad" (dh = Bᵀ·g), "lora_a_grad",
    "lora_input_grad" (Aᵀ·dh), "attention".
    """

    side: Side
    phase: Phase
    #: Block index, or None for the head.
    block: int | None
    module: str
    kind: str
    flops: float


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per sample (mean over the given lengths) of one method, split by machine and pass."""

    device_forward: float
    device_backward: float
    server_forward: float
    server_backward: float

    @property
    def device(self) -> float:
        return self.device_forward + self.device_backward

    @property
    def server(self) -> float:
        return self.server_forward + self.server_backward

    @property
    def total(self) -> float:
        return self.device + self.server

    def as_dict(self) -> dict[str, float]:
        """The four counts plus the device, server and overall totals."""
        return {**asdict(self), "device": self.device, "server": self.server, "total": self.total}


@dataclass(frozen=True)
class _Shape:
    model_type: str
    layers: int
    hidden: int
    heads: int
    head_dim: int
    gemms: tuple[Gemm, ...]
    #: Per block: the sliding window (keys a query sees at most), or None for full causal attention.
    windows: tuple[int | None, ...]


@dataclass(frozen=True)
class _Plan:
    """Where LoRA sits and which blocks run on the device, for one method."""

    lora_from: int
    device_blocks: int
    head_on_device: bool
    a_trained: bool


def _as_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        import transformers

        return transformers.AutoConfig.for_model(**config)
    return config


def _shape(config: Any) -> _Shape:
    model_type = getattr(config, "model_type", None)
    if model_type in ("llama", "gemma3_text"):
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(config.intermediate_size)
        gemms = (
            Gemm("self_attn.q_proj", hidden, heads * head_dim, 0),
            Gemm("self_attn.k_proj", hidden, kv_heads * head_dim, 0),
            Gemm("self_attn.v_proj", hidden, kv_heads * head_dim, 0),
            Gemm("self_attn.o_proj", heads * head_dim, hidden, 2),
            Gemm("mlp.gate_proj", hidden, inter, 3),
            Gemm("mlp.up_proj", hidden, inter, 3),
            Gemm("mlp.down_proj", inter, hidden, 4),
        )
        layers = int(config.num_hidden_layers)
        return _Shape(model_type, layers, hidden, heads, head_dim, gemms, _windows(config, layers))
    if model_type == "gpt2":
        hidden = int(config.n_embd)
        heads = int(config.n_head)
        inner = int(getattr(config, "n_inner", None) or 4 * hidden)
        gemms = (
            Gemm("attn.c_attn", hidden, 3 * hidden, 0),
            Gemm("attn.c_proj", hidden, hidden, 2),
            Gemm("mlp.c_fc", hidden, inner, 3),
            Gemm("mlp.c_proj", inner, hidden, 4),
        )
        layers = int(config.n_layer)
        return _Shape(model_type, layers, hidden, heads, hidden // heads, gemms, (None,) * layers)
    raise ValueError(f"model family {model_type!r} has no FLOP inventory (supported: gemma3_text, gpt2, llama)")


def _windows(config: Any, layers: int) -> tuple[int | None, ...]:
    """Each block's sliding window from ``layer_types`` (Gemma 3), None where attention is full."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    window = getattr(config, "sliding_window", None)
    return tuple(int(window) if t == "sliding_attention" and window else None for t in types[:layers])


def _causal_pairs(seq_len: int, window: int | None) -> int:
    """Query-key pairs of one causal row of ``seq_len`` tokens: query i sees min(i + 1, window) keys."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def gemm_inventory(config: Any) -> list[Gemm]:
    """The weight GEMMs of one block of ``config``'s family, in forward order (by ``stage``)."""
    return list(_shape(_as_config(config)).gemms)


def _plan(method: str, split: int | None, layers: int) -> _Plan:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if method in SPLIT_METHODS:
        if split is None or not 1 <= split <= layers - 1:
            raise ValueError(f"{method} needs a split in 1..{layers - 1}, got {split!r}")
        lora_from = split if method == "splitfrozen" else 0
        return _Plan(lora_from, device_blocks=split, head_on_device=False, a_trained=True)
    if method == "centralized":
        return _Plan(0, device_blocks=0, head_on_device=False, a_trained=True)
    return _Plan(0, device_blocks=layers, head_on_device=True, a_trained=method != "ffa")


def _lora_matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _default_targets(model_type: str) -> tuple[str, ...]:
    # Imported here: the family adapters pull in torch, which the arithmetic itself does not need.
    from sftool.exporters.families import adapter_for

    return adapter_for(model_type).default_lora_targets


def flop_terms(
    config: Any,
    method: str,
    split: int | None,
    seq_lens: Sequence[int],
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    num_labels: int = 2,
) -> list[FlopTerm]:
    """Every counted term of ``method`` (see the module docstring), as means per sample over ``seq_lens``.

    ``config``: a transformers config, or a dict of its fields with ``model_type``. ``split``: the cut
    k, ignored by the methods that do not split. ``lora_targets``: peft ``target_modules``, default the
    family's. Zero terms are left out.
    """
    cfg = _as_config(config)
    shape = _shape(cfg)
    plan = _plan(method, split, shape.layers)
    if not seq_lens or any(int(t) < 1 for t in seq_lens):
        raise ValueError(f"seq_lens must be a non-empty list of positive token counts, got {list(seq_lens)!r}")
    if lora_rank < 1 or num_labels < 1:
        raise ValueError(f"lora_rank and num_labels must be positive, got {lora_rank} and {num_labels}")
    targets = tuple(lora_targets) if lora_targets is not None else _default_targets(shape.model_type)
    targeted = {g.name for g in shape.gemms if _lora_matches(g.name, targets)}
    if not targeted:
        names = ", ".join(g.name for g in shape.gemms)
        raise ValueError(f"LoRA targets {list(targets)!r} match no module of a {shape.model_type} block ({names})")

    n = len(seq_lens)
    tokens = sum(int(t) for t in seq_lens) / n
    r = lora_rank
    layers = shape.layers
    # Every LoRA block holds a trained factor (B always trains), so the first trainable position is the
    # earliest targeted stage of the first LoRA block; the head, trained in every method, comes last.
    first_stage = min(g.stage for g in shape.gemms if g.name in targeted)
    first_trainable = (plan.lora_from, first_stage) if plan.lora_from < layers else (layers, 0)

    terms: list[FlopTerm] = []

    def add(side: Side, phase: Phase, block: int | None, module: str, kind: str, flops: float) -> None:
        if flops:
            terms.append(FlopTerm(side, phase, block, module, kind, flops))

    for b in range(layers):
        pairs = sum(_causal_pairs(int(t), shape.windows[b]) for t in seq_lens) / n
        attention_forward = 2 * (2 * shape.head_dim * shape.heads * pairs)  # QK^T and AV
        side: Side = "device" if b < plan.device_blocks else "server"
        attention_done = False
        for g in sorted(shape.gemms, key=lambda g: g.stage):
            if not attention_done and g.stage > ATTENTION_STAGE:
                # Emitted in forward order, between the projections that feed attention and the next stage.
                add(side, "forward", b, "attention", "attention", attention_forward)
                if first_trainable < (b, ATTENTION_STAGE):
                    add(side, "backward", b, "attention", "attention", 2 * attention_forward)
                attention_done = True
            pos = (b, g.stage)
            need_dx = first_trainable < pos
            lora = b >= plan.lora_from and g.name in targeted
            dense = 2 * g.in_features * g.out_features * tokens
            add(side, "forward", b, g.name, "gemm", dense)
            if need_dx:
                add(side, "backward", b, g.name, "input_grad", dense)
            if lora:
                lora_in = 2 * r * g.in_features * tokens
                lora_out = 2 * r * g.out_features * tokens
                add(side, "forward", b, g.name, "lora", lora_in + lora_out)
                add(side, "backward", b, g.name, "lora_b_grad", lora_out)
                if plan.a_trained or need_dx:
                    add(side, "backward", b, g.name, "lora_h_grad", lora_out)
                if plan.a_trained:
                    add(side, "backward", b, g.name, "lora_a_grad", lora_in)
                if need_dx:
                    add(side, "backward", b, g.name, "lora_input_grad", lora_in)

    head_side: Side = "device" if plan.head_on_device else "server"
    head = 2 * shape.hidden * num_labels  # one token per sample
    add(head_side, "forward", None, HEAD_NAME, "head", head)
    add(head_side, "backward", None, HEAD_NAME, "weight_grad", head)
    if first_trainable < (layers, 0):
        add(head_side, "backward", None, HEAD_NAME, "input_grad", head)
    return terms


def count_flops(
    config: Any,
    method: str,
    split: int | None,
    seq_lens: Sequence[int],
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    num_labels: int = 2,
) -> FlopCount:
    """FLOPs per sample (mean over ``seq_lens``) of ``method`` on the device and on the server.

    Arguments as for ``flop_terms``. Raises ValueError for an unknown method or family, a split
    outside 1..L-1 for the split methods, or LoRA targets that match nothing.
    """
    sums = {(side, phase): 0.0 for side in ("device", "server") for phase in ("forward", "backward")}
    for term in flop_terms(config, method, split, seq_lens, lora_rank, lora_targets, num_labels):
        sums[(term.side, term.phase)] += term.flops
    return FlopCount(
        device_forward=sums[("device", "forward")],
        device_backward=sums[("device", "backward")],
        server_forward=sums[("server", "forward")],
        server_backward=sums[("server", "backward")],
    )
