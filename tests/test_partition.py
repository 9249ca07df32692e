"""Device part followed by server part reproduces the unsplit model, for every family and several k."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from sftool.errors import SftoolError
from sftool.exporters.families import adapter_for
from sftool.exporters.families.base import position_ids_from_mask
from sftool.exporters.partition import BlockRunner, DevicePart, check_split, weights_fingerprint


def padded_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 2:] = 0
    mask[3, :3] = 0  # left padding works too: positions count real tokens only
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_split_forward_equals_full_forward(family, tiny_model):
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_model(family), attn_implementation="sdpa").eval()
    adapter = adapter_for(model.config.model_type)
    layers = adapter.num_layers(model.config)
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        for k in sorted({1, layers // 2, layers - 1}):
            hidden = DevicePart(adapter, model, k).eval()(ids, mask)
            out = BlockRunner(adapter, model)(hidden, mask, k)
            diff = (out - full).abs()[mask.bool()].max().item()
            assert diff <= 1e-5, f"{family} split {k}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_device_part_holds_only_device_weights(family, tiny_model):
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_model(family))
    adapter = adapter_for(model.config.model_type)
    part = DevicePart(adapter, model, 1)
    n_device = sum(p.numel() for p in part.parameters())
    n_blocks = sum(p.numel() for p in adapter.layers(model).parameters())
    assert len(part.blocks) == 1
    assert n_device < sum(p.numel() for p in model.parameters()) - n_blocks / 2


def test_split_range_is_checked():
    check_split(1, 4)
    check_split(3, 4)
    for bad in (0, 4, -1):
        with pytest.raises(SftoolError, match="out of range"):
            check_split(bad, 4)


def test_weights_fingerprint_detects_changed_weights(tiny_model):
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_model("gpt2"))
    adapter = adapter_for("gpt2")
    before = weights_fingerprint(DevicePart(adapter, model, 2))
    assert before == weights_fingerprint(DevicePart(adapter, model, 2))
    with torch.no_grad():
        adapter.layers(model)[1].ln_1.weight[0] += 1e-3
    assert weights_fingerprint(DevicePart(adapter, model, 2)) != before


def test_fused_export_layers_equal_the_model_on_right_padded_rows(tiny_model):
    """The export-only Llama layers (packed QKV, GroupQueryAttention's eager twin, Div-form RMS norm)
    compute what the transformers blocks compute, on every real token of right-padded rows."""
    import transformers
    from sftool.exporters.families.llama import FusedLlamaLayer

    model = transformers.AutoModel.from_pretrained(tiny_model("llama")).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped K/V heads
    adapter = adapter_for("llama")
    part = DevicePart(adapter, model, 3).eval()
    fused = part.fused_for_export(max_seq_len=32)
    assert all(isinstance(block, FusedLlamaLayer) for block in fused.blocks)
    ids, mask = padded_batch(model.config.vocab_size)
    mask[3] = torch.tensor([1] * 5 + [0] * 6)  # right padding only
    with torch.no_grad():
        ref, got = part(ids, mask), fused(ids, mask)
    assert (got - ref).abs()[mask.bool()].max().item() <= 1e-5
    assert not got[~mask.bool()].any()  # it ran on the real tokens only; padding comes back as zeros
    # The original part is untouched: the fused copy owns its blocks.
    assert not any(isinstance(block, FusedLlamaLayer) for block in part.blocks)


def test_token_layout_packs_the_real_tokens_in_order_and_restores_the_padded_layout():
    from sftool.exporters.token_layout import TokenLayout

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2) + 1
    layout = TokenLayout(mask)
    packed = layout.pack(x)
    assert packed.shape == (8, 2) and torch.equal(packed, x[mask.bool()])
    assert layout.lengths.tolist() == [3, 1, 4]
    assert torch.equal(layout.pack_ids(mask * 7), torch.full((1, 8), 7))
    restored = layout.unpack_zero_padded(packed)
    assert torch.equal(restored, x * mask[..., None])
    # For attention: real positions exact, padding positions hold some real token's row.
    for_attention = layout.unpack(packed)
    assert torch.equal(for_attention[mask.bool()], x[mask.bool()])
    assert all(any(torch.equal(row, p) for p in packed) for row in for_attention[~mask.bool()])


def test_families_without_fused_layers_export_a_plain_copy(tiny_model):
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_model("gpt2")).eval()
    part = DevicePart(adapter_for("gpt2"), model, 2).eval()
    copy = part.fused_for_export(max_seq_len=32)
    assert copy is not part and [type(b) for b in copy.blocks] == [type(b) for b in part.blocks]


def test_fused_layers_keep_rope_scaling_and_projection_biases():
    """Llama-3.2's rope scaling ("llama3") lives in the rotary tables the fused layer copies; biased
    q/k/v projections (attention_bias) are packed with their biases."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, attention_bias=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 64, "rope_type": "llama3"},
    )
    model = transformers.LlamaModel(config).eval()
    part = DevicePart(adapter_for("llama"), model, 2).eval()
    fused = part.fused_for_export(max_seq_len=200)
    ids = torch.randint(0, 64, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 90:] = 0
    with torch.no_grad():
        diff = (fused(ids, mask) - part(ids, mask)).abs()[mask.bool()].max().item()
    assert diff <= 1e-5, diff
