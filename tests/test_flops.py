"""The FLOP counter against hand counts, against real module shapes, and against autograd itself."""

from __future__ import annotations

import pytest
import transformers
from sftool.flops import METHODS, count_flops, flop_terms, gemm_inventory

# The hand-count model: a 2-block llama with GQA (2 query heads, 1 key/value head).
L, H, FF, NH, NKV, DH = 2, 8, 16, 2, 1, 4
R, C = 2, 3
LENS = [3, 5]
TOK = (3 + 5) / 2  # mean tokens per sample: GEMM terms scale with it
PAIRS = (3 * 4 / 2 + 5 * 6 / 2) / 2  # mean causal query-key pairs T(T+1)/2: attention scales with it


def tiny_llama(**overrides) -> transformers.LlamaConfig:
    fields = dict(
        vocab_size=32,
        num_hidden_layers=L,
        hidden_size=H,
        intermediate_size=FF,
        num_attention_heads=NH,
        num_key_value_heads=NKV,
        head_dim=DH,
        pad_token_id=0,
        num_labels=C,
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


def tiny_gemma3(**overrides) -> transformers.Gemma3TextConfig:
    """The hand-count shapes as Gemma 3: a sliding-window block (window 2) before a full-attention one."""
    fields = dict(
        vocab_size=32, num_hidden_layers=L, hidden_size=H, intermediate_size=FF, num_attention_heads=NH,
        num_key_value_heads=NKV, head_dim=DH, sliding_window=2, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, num_labels=C,
    )
    return transformers.Gemma3TextConfig(**{**fields, **overrides})


def tiny_gpt2(**overrides) -> transformers.GPT2Config:
    fields = dict(vocab_size=32, n_layer=3, n_embd=16, n_head=2, n_positions=64, pad_token_id=0, num_labels=C)
    return transformers.GPT2Config(**{**fields, **overrides})


# Per block, per sample, written out from the formula statement. Shapes (in, out):
# q (H, NH*DH), k (H, NKV*DH), v (H, NKV*DH), o (NH*DH, H), gate (H, FF), up (H, FF), down (FF, H).
BASE_FWD = (
    2 * H * NH * DH + 2 * H * NKV * DH + 2 * H * NKV * DH + 2 * NH * DH * H + 2 * H * FF + 2 * H * FF + 2 * FF * H
) * TOK
ATTN_FWD = 2 * DH * NH * PAIRS + 2 * DH * NH * PAIRS  # QK^T + AV
# LoRA forward 2r(in+out) on the default targets q, k, v, o.
LORA_FWD = (2 * R * (H + NH * DH) + 2 * R * (H + NKV * DH) + 2 * R * (H + NKV * DH) + 2 * R * (NH * DH + H)) * TOK
HEAD = 2 * H * C  # one token per sample

# Backward pieces of one LoRA block (default targets).
QKV_OUT = NH * DH + NKV * DH + NKV * DH  # q, k, v output widths together
LORA_B_GRAD = (2 * R * QKV_OUT + 2 * R * H) * TOK  # dB = g h^T: 2r*out, q/k/v and o
LORA_A_GRAD = (2 * R * 3 * H + 2 * R * NH * DH) * TOK  # dA = dh x^T: 2r*in, q/k/v (in = H each) and o
LORA_H_GRAD = (2 * R * QKV_OUT + 2 * R * H) * TOK  # dh = B^T g: 2r*out, wherever A trains
QKV_DX = (2 * H * NH * DH + 2 * H * NKV * DH + 2 * H * NKV * DH) * TOK  # q/k/v input gradients, frozen weights
QKV_LORA_DX = 3 * 2 * R * H * TOK  # A^T dh of q/k/v: 2r*in
O_DX = 2 * NH * DH * H * TOK
O_LORA_DX = 2 * R * NH * DH * TOK
MLP_DX = (2 * H * FF + 2 * H * FF + 2 * FF * H) * TOK
ATTN_BWD = 2 * ATTN_FWD
# The first LoRA block: nothing trainable lies below its q/k/v, so their input gradients are skipped.
FIRST_BLOCK_BWD = LORA_B_GRAD + LORA_A_GRAD + LORA_H_GRAD + ATTN_BWD + O_DX + O_LORA_DX + MLP_DX
# A LoRA block above a trainable one: every input gradient is needed.
LATER_BLOCK_BWD = FIRST_BLOCK_BWD + QKV_DX + QKV_LORA_DX
HEAD_BWD = HEAD + HEAD  # weight gradient and input gradient


def counts(method: str, split: int | None = 1, config=None, **kwargs):
    return count_flops(config or tiny_llama(), method, split, LENS, lora_rank=R, num_labels=C, **kwargs)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("splitfrozen", (BASE_FWD + ATTN_FWD, 0, BASE_FWD + ATTN_FWD + LORA_FWD + HEAD, FIRST_BLOCK_BWD + HEAD_BWD)),
        (
            "splitlora",
            (
                BASE_FWD + ATTN_FWD + LORA_FWD,
                FIRST_BLOCK_BWD,
                BASE_FWD + ATTN_FWD + LORA_FWD + HEAD,
                LATER_BLOCK_BWD + HEAD_BWD,
            ),
        ),
        ("fedlora", (2 * (BASE_FWD + ATTN_FWD + LORA_FWD) + HEAD, FIRST_BLOCK_BWD + LATER_BLOCK_BWD + HEAD_BWD, 0, 0)),
        (
            "ffa",
            (
                2 * (BASE_FWD + ATTN_FWD + LORA_FWD) + HEAD,
                # No dA anywhere; in block 0, dh of q/k/v was only there for dA. o's dh still feeds its dx.
                FIRST_BLOCK_BWD + LATER_BLOCK_BWD + HEAD_BWD - 2 * LORA_A_GRAD - 2 * R * QKV_OUT * TOK,
                0,
                0,
            ),
        ),
        (
            "centralized",
            (0, 0, 2 * (BASE_FWD + ATTN_FWD + LORA_FWD) + HEAD, FIRST_BLOCK_BWD + LATER_BLOCK_BWD + HEAD_BWD),
        ),
    ],
)
def test_hand_count_tiny_llama(method, expected):
    got = counts(method)
    assert (got.device_forward, got.device_backward, got.server_forward, got.server_backward) == pytest.approx(
        expected, rel=1e-12, abs=0
    )
    assert got.as_dict()["device"] == pytest.approx(expected[0] + expected[1], rel=1e-12)


def test_dict_config_gives_the_same_count():
    fields = tiny_llama().to_dict()
    assert count_flops(fields, "splitlora", 1, LENS, R, None, C) == counts("splitlora")


def device_backward_terms(method: str, targets=None, split: int = 1) -> dict[tuple[int, str], set[str]]:
    found: dict[tuple[int, str], set[str]] = {}
    for t in flop_terms(tiny_llama(), method, split, LENS, R, targets, C):
        if t.side == "device" and t.phase == "backward":
            found.setdefault((t.block, t.module), set()).add(t.kind)
    return found


def test_block0_rule_in_splitlora():
    terms = device_backward_terms("splitlora")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        # Trained LoRA factors, but nothing trainable below: no input gradient, only what dA and dB need.
        assert terms[(0, name)] == {"lora_b_grad", "lora_h_grad", "lora_a_grad"}
    assert terms[(0, "attention")] == {"attention"}
    assert terms[(0, "self_attn.o_proj")] == {
        "input_grad",
        "lora_b_grad",
        "lora_h_grad",
        "lora_a_grad",
        "lora_input_grad",
    }
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert terms[(0, name)] == {"input_grad"}


def test_strictly_before_with_o_proj_alone():
    # o_proj's own LoRA does not lie before o_proj: its input gradient and attention's backward go away.
    got = counts("splitlora", lora_targets=["o_proj"])
    expected = (2 * R * H + 2 * R * H + 2 * R * NH * DH) * TOK + MLP_DX  # dB, dh, dA of o; gate/up/down dx
    assert got.device_backward == pytest.approx(expected, rel=1e-12)
    assert got.device_forward == pytest.approx(BASE_FWD + ATTN_FWD + 2 * R * (NH * DH + H) * TOK, rel=1e-12)


def test_split_cut_gradient_is_counted_on_the_server():
    # SplitLoRA's server sends back the gradient at block k's input; SplitFrozen's has none to send.
    assert counts("splitlora").server_backward - counts("splitfrozen").server_backward == pytest.approx(
        QKV_DX + QKV_LORA_DX, rel=1e-12
    )


# gpt2 per block, n_embd G, default targets c_attn (G, 3G), attn.c_proj (G, G) and mlp.c_proj (4G, G)
# ("c_proj" matches both).
def gpt2_lora_fwd(g: int, r: int, tokens: float) -> float:
    return (2 * r * (g + 3 * g) + 2 * r * (g + g) + 2 * r * (4 * g + g)) * tokens


def gpt2_a_grad(g: int, r: int, tokens: float) -> float:
    return (2 * r * g + 2 * r * g + 2 * r * 4 * g) * tokens


@pytest.mark.parametrize(
    ("config", "split", "lens"),
    [
        (tiny_llama(num_hidden_layers=4), 1, [3, 5]),
        (tiny_llama(num_hidden_layers=4), 3, [7]),
        (tiny_gemma3(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2), 1, [3, 5]),
        (tiny_gpt2(), 2, [4, 9, 2]),
    ],
)
def test_relations(config, split, lens):
    r = 3
    run = {m: count_flops(config, m, split, lens, r, None, C) for m in METHODS}
    sf, sl, fl, ffa = run["splitfrozen"], run["splitlora"], run["fedlora"], run["ffa"]
    assert 0 < sf.device < sl.device < fl.device
    assert sf.device_backward == 0 and fl.server == 0 and run["centralized"].device == 0
    # Same trained parameters, same work, only placed differently.
    assert sl.total == pytest.approx(fl.total, rel=1e-12)
    assert run["centralized"].as_dict()["server"] == pytest.approx(fl.device, rel=1e-12)

    tokens = sum(lens) / len(lens)
    layers = config.num_hidden_layers
    if config.model_type in ("llama", "gemma3_text"):
        lora_fwd_per_block = LORA_FWD / TOK * tokens  # same widths and targets as the hand-count model, rank R
        lora_fwd_per_block *= r / R
        a_grad = layers * LORA_A_GRAD / TOK * tokens * r / R
        dh_block0 = 2 * r * QKV_OUT * tokens  # dh of q/k/v in block 0 exists for dA alone
    else:
        g = config.n_embd
        lora_fwd_per_block = gpt2_lora_fwd(g, r, tokens)
        a_grad = layers * gpt2_a_grad(g, r, tokens)
        dh_block0 = 2 * r * 3 * g * tokens  # c_attn's dh in block 0
    assert ffa.device_forward == fl.device_forward
    assert ffa.device_backward < fl.device_backward
    assert fl.device_backward - ffa.device_backward == pytest.approx(a_grad + dh_block0, rel=1e-12)
    # The unsplit model's forward: the split moves work, it does not add any.
    assert sf.device_forward + sf.server_forward == pytest.approx(
        fl.device_forward - split * lora_fwd_per_block, rel=1e-12
    )


def test_gemma3_sliding_window_pairs_by_hand():
    # Window 2 over rows of 3 and 5 tokens: 1+2+2 and 1+2+2+2+2 pairs in block 0, T(T+1)/2 in block 1.
    attention = {t.block: t.flops for t in flop_terms(tiny_gemma3(), "centralized", None, LENS, R, None, C)
                 if t.kind == "attention" and t.phase == "forward"}
    per_pair = 2 * (2 * DH * NH)
    assert attention == {0: per_pair * (5 + 9) / 2, 1: per_pair * PAIRS}
    # The rest is Llama's inventory: same GEMMs, same LoRA terms.
    gemma = [t for t in flop_terms(tiny_gemma3(), "splitlora", 1, LENS, R, None, C) if t.kind != "attention"]
    llama = [t for t in flop_terms(tiny_llama(), "splitlora", 1, LENS, R, None, C) if t.kind != "attention"]
    assert gemma == llama


def test_gpt2_n_inner_and_c_proj_matching():
    inventory = {g.name: (g.in_features, g.out_features, g.stage) for g in gemm_inventory(tiny_gpt2(n_inner=40))}
    assert inventory == {
        "attn.c_attn": (16, 48, 0),
        "attn.c_proj": (16, 16, 2),
        "mlp.c_fc": (16, 40, 3),
        "mlp.c_proj": (40, 16, 4),
    }
    lora = {t.module for t in flop_terms(tiny_gpt2(), "fedlora", None, [4], 2) if t.kind == "lora" and t.block == 0}
    assert lora == {"attn.c_attn", "attn.c_proj", "mlp.c_proj"}
    only_mlp = {t.module for t in flop_terms(tiny_gpt2(), "fedlora", None, [4], 2, ["mlp.c_proj"]) if t.kind == "lora"}
    assert only_mlp == {"mlp.c_proj"}


def real_model(config):
    import torch

    torch.manual_seed(0)
    if config.model_type == "llama":
        model = transformers.LlamaForSequenceClassification(config)
        return model, model.model.layers
    if config.model_type == "gemma3_text":
        model = transformers.Gemma3TextForSequenceClassification(config)
        return model, model.model.layers
    model = transformers.GPT2ForSequenceClassification(config)
    return model, model.transformer.h


def linear_widths(module) -> tuple[int, int]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    assert isinstance(module, Conv1D)
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


@pytest.mark.parametrize(
    ("config", "split"),
    [(tiny_llama(num_hidden_layers=3, head_dim=6), 2), (tiny_gemma3(head_dim=6), 1), (tiny_gpt2(n_inner=40), 2)],
)
def test_forward_gemms_match_real_module_shapes(config, split):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model, layers = real_model(config)
    lens = [3, 6]
    real = 0
    for block in layers[:split]:
        for _, module in block.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                fan_in, fan_out = linear_widths(module)
                real += 2 * fan_in * fan_out * sum(lens) / len(lens)
    for g in gemm_inventory(config):
        assert linear_widths(layers[0].get_submodule(g.name)) == (g.in_features, g.out_features)
    counted = [t for t in flop_terms(config, "splitfrozen", split, lens, num_labels=C) if t.side == "device"]
    assert sum(t.flops for t in counted if t.kind == "gemm") == pytest.approx(real, rel=1e-12)
    head = [t.flops for t in flop_terms(config, "fedlora", None, lens, num_labels=C) if t.kind == "head"]
    assert head == [2 * model.score.in_features * model.score.out_features]


def measured(config, method: str, split: int | None, length: int, rank: int) -> dict[tuple[str, str], float]:
    """FLOPs torch's counter sees when the method's device and server steps really run, one sample."""
    import peft
    import torch
    from sftool.exporters.families import adapter_for
    from sftool.exporters.families.base import position_ids_from_mask
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = real_model(config)
    model.eval()
    adapter = adapter_for(config.model_type)
    layers_n = adapter.num_layers(config)
    lora_layers = range(split, layers_n) if method == "splitfrozen" else range(layers_n)
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(adapter.default_lora_targets),
        layers_to_transform=list(lora_layers),
        fan_in_fan_out=adapter.lora_fan_in_fan_out,
    )
    model = peft.get_peft_model(model, lora)
    if method == "ffa":
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    backbone = adapter.backbone(model)
    head = model.get_base_model().score
    head.weight.requires_grad_(True)
    modules = adapter.embedding_modules(backbone)
    layers = adapter.layers(backbone)
    ids = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():  # embeddings and rotary tables: not counted
        hidden = adapter.embed(modules, ids, pos)
        ctx = adapter.context(modules, hidden, mask, pos)

    def blocks(h, lo, hi):
        for layer in layers[lo:hi]:
            h = adapter.run_layer(layer, h, ctx)
        return h

    def pooled_head(h):  # the head on the last token only, as counted
        return head(adapter.final_norm(backbone)(h)[:, -1])

    out: dict[tuple[str, str], float] = {}

    def timed(side: str, phase: str, fn):
        with FlopCounterMode(display=False) as counter:
            result = fn()
        out[(side, phase)] = out.get((side, phase), 0) + counter.get_total_flops()
        return result

    if method in ("splitfrozen", "splitlora"):
        if method == "splitfrozen":
            with torch.no_grad():
                cut_out = timed("device", "forward", lambda: blocks(hidden, 0, split))
            cut = cut_out.detach()
        else:
            cut_out = timed("device", "forward", lambda: blocks(hidden, 0, split))
            cut = cut_out.detach().requires_grad_(True)  # the server returns this gradient
        logits = timed("server", "forward", lambda: pooled_head(blocks(cut, split, layers_n)))
        timed("server", "backward", lambda: logits.sum().backward())
        if method == "splitlora":
            timed("device", "backward", lambda: cut_out.backward(cut.grad))
    else:
        side = "server" if method == "centralized" else "device"
        logits = timed(side, "forward", lambda: pooled_head(blocks(hidden, 0, layers_n)))
        timed(side, "backward", lambda: logits.sum().backward())
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_counts_match_autograd(family, method):
    # Eager attention: the counter then sees the attention matmuls, over all T*T pairs (the mask does not
    # save work there), where the contract counts T(T+1)/2 causal pairs, or fewer in a sliding window.
    length, rank = 5, 3
    if family == "llama":
        config = tiny_llama(num_hidden_layers=3, head_dim=6, attn_implementation="eager")
        counted_pairs = [length * (length + 1) / 2] * 3
    elif family == "gemma3":
        config = tiny_gemma3(
            num_hidden_layers=3, head_dim=6, sliding_window=3, attn_implementation="eager",
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        counted_pairs = [1 + 2 + 3 + 3 + 3, length * (length + 1) / 2, 1 + 2 + 3 + 3 + 3]  # by hand, window 3
    else:
        config = tiny_gpt2(n_inner=40, attn_implementation="eager")
        counted_pairs = [length * (length + 1) / 2] * 3
    split = 2 if method in ("splitfrozen", "splitlora") else None
    real = measured(config, method, split, length, rank)
    expected: dict[tuple[str, str], float] = {}
    for t in flop_terms(config, method, split, [length], rank, None, C):
        scale = length * length / counted_pairs[t.block] if t.kind == "attention" else 1.0
        expected[(t.side, t.phase)] = expected.get((t.side, t.phase), 0) + t.flops * scale
    assert set(real) | set(expected) == set(expected)
    for key, value in expected.items():
        assert real.get(key, 0) == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="splitfrozn", split=1), "unknown method"),
        (dict(method="splitlora", split=0), "split"),
        (dict(method="splitfrozen", split=L), "split"),
        (dict(method="splitlora", split=None), "split"),
        (dict(method="fedlora", split=1, lora_targets=["nothing"]), "match no module"),
        (dict(method="fedlora", split=None, seq_lens=[]), "seq_lens"),
    ],
)
def test_errors(kwargs, message):
    args = {"config": tiny_llama(), "seq_lens": LENS, **kwargs}
    with pytest.raises(ValueError, match=message):
        count_flops(**args)


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        count_flops(transformers.BertConfig(), "fedlora", None, [4])


def test_split_is_ignored_where_nothing_is_split():
    assert counts("fedlora", split=None) == counts("fedlora", split=99)
