"""The server model: decomposed backward (only LoRA + head get gradients, nothing for the input),
and the saved adapter loads with plain peft on the unsplit model with the same predictions."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from sftool.exporters.partition import DevicePart
from sftool.server.mixing import Sample, collate
from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
from sftool.server.trainer import OptimSettings, Trainer


def tiny_server(path, splits=(2,)):
    return SplitServerModel(SplitModelSpec(str(path), 2, list(splits), 0, LoraSettings(rank=4, dropout=0.0)))


def device_batch(model: SplitServerModel, n: int = 6, seed: int = 0):
    """Token batch with padding, and its activations as a device computes them (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, 10), generator=g)
    mask = torch.ones(n, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    ids[mask == 0] = 0  # pad id
    with torch.no_grad():
        part = DevicePart(model.adapter, model.adapter.backbone(model.peft_model), model.train_from).eval()
        hidden = part(ids, mask)
    return ids, mask, hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_touches_only_lora_and_head(family, tiny_model):
    model = tiny_server(tiny_model(family))
    _, mask, hidden = device_batch(model)
    assert not hidden.requires_grad
    samples = [Sample(hidden[i], mask[i], i % 2, "d", i, 0, 0) for i in range(len(mask))]
    batch = collate(samples)
    loss = torch.nn.functional.cross_entropy(model(batch.hidden, batch.attention_mask), batch.labels)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or "score" in n for n in with_grad), sorted(with_grad)[:5]
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    # LoRA only on the server's blocks.
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) if ".layers." in n else int(n.split(".h.")[1].split(".")[0])
                   for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_layers == set(range(model.train_from, model.num_layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_with_plain_peft_and_predicts_the_same(family, tiny_model, tmp_path):
    import transformers
    from peft import PeftModel

    model = tiny_server(tiny_model(family))
    trainer = Trainer(model, OptimSettings(lr=1e-2))
    for step in range(5):
        _, mask, hidden = device_batch(model, seed=step)
        trainer.step(collate([Sample(hidden[i], mask[i], i % 2, "d", i, 0, 0) for i in range(len(mask))]))
    model.save_adapter(tmp_path / "adapter")

    model.eval()
    ids, mask, hidden = device_batch(model, seed=99)
    with torch.no_grad():
        split_logits = model(hidden, mask)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model(family), num_labels=2, pad_token_id=0)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(split_logits, plain_logits, atol=1e-5), (split_logits - plain_logits).abs().max()
    assert not torch.allclose(split_logits, torch.zeros_like(split_logits))


def test_merge_and_merged_onnx_export(tiny_model, tmp_path):
    """A run folder merges into a plain model whose predictions match the split model, and exports to ONNX."""
    import json

    import transformers
    from cli_helpers import run_cli

    model = tiny_server(tiny_model("llama"))
    trainer = Trainer(model, OptimSettings(lr=1e-2))
    for step in range(3):
        _, mask, hidden = device_batch(model, seed=step)
        trainer.step(collate([Sample(hidden[i], mask[i], i % 2, "d", i, 0, 0) for i in range(len(mask))]))
    run = tmp_path / "run"
    model.save_adapter(run / "adapter")
    (run / "run.json").write_text(json.dumps({"source": str(tiny_model("llama")), "num_labels": 2, "label_names": ["no", "yes"]}))

    result = run_cli("merge", "--run", run, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "no", 1: "yes"}
    model.eval()
    ids, mask, hidden = device_batch(model, seed=7)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, model(hidden, mask), atol=1e-5)

    result = run_cli("export", "--merged", run, "--out", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    parity = json.loads((tmp_path / "onnx" / "sftool_parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4 and parity["agreement"] == 1.0
    assert (tmp_path / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_gives_the_same_gradients_with_dropout(family, tiny_model):
    """Recomputed blocks (``--recompute``) give the gradients of the stored-activation backward, LoRA
    dropout included: the recomputation replays the dropout mask of the forward."""
    grads = {}
    for recompute in (False, True):
        model = SplitServerModel(SplitModelSpec(str(tiny_model(family)), 2, [1], 0, LoraSettings(rank=4, dropout=0.3),
                                                recompute=recompute))
        for p in model.trainable_parameters():  # nonzero B factors: dropout then changes the gradients
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        model.train()
        _, mask, hidden = device_batch(model)
        calls, block = [], model.runner.blocks[1]
        forward = block.forward  # counted here: torch runs no module hooks while it recomputes
        block.forward = lambda *a, _c=calls, _f=forward, **k: _c.append(1) or _f(*a, **k)
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(model(hidden, mask), torch.arange(len(mask)) % 2)
        loss.backward()
        assert len(calls) == (2 if recompute else 1)  # recomputed in the backward, or not at all
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 4
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
    # Not vacuous: without the replayed RNG state, another dropout draw gives other gradients.
    model.train()
    loss = torch.nn.functional.cross_entropy(model(hidden, mask), torch.arange(len(mask)) % 2)
    model.zero_grad()
    loss.backward()
    assert any(not torch.allclose(p.grad, grads[True][n]) for n, p in model.named_parameters() if p.grad is not None)
