"""The baselines on the training core: FedAvg of adapters, FFA-LoRA's exact average, SplitLoRA's cut
gradient, and the streaming server against the same run with devices simulated in process."""

from __future__ import annotations

import json

import pytest
import torch
from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
from sftool.server.trainer import OptimSettings
from sftool.training.methods.device_side import fedavg, layer_of
from sftool.training.methods.fedlora import FedLoRA
from sftool.training.methods.splitlora import SplitLoRA
from sftool.training.sources import TokenBatch, interleave


def whole_model(path, splits=(2,), labels: int = 2) -> SplitServerModel:
    return SplitServerModel(SplitModelSpec(str(path), labels, list(splits), 0, LoraSettings(rank=4, dropout=0.0),
                                           lora_layers=range(4)))


def token_batch(device: str, seed: int, n: int = 6, t: int = 9, labels: int = 2) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, t), generator=g)  # no pad id: every row is all real tokens
    return TokenBatch(device, 0, ids, torch.ones(n, t, dtype=torch.long), torch.arange(n) % labels, list(range(n)))


def test_fedavg_of_a_hand_computable_case():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    b = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])]
    weighted = fedavg([a, b], [1, 3])  # (1*1 + 3*3)/4, (1*2 + 3*6)/4, (1*4 + 3*0)/4
    assert torch.allclose(weighted[0], torch.tensor([2.5, 5.0])) and torch.allclose(weighted[1], torch.tensor([[1.0]]))
    plain = fedavg([a, b])
    assert torch.allclose(plain[0], torch.tensor([2.0, 4.0])) and torch.allclose(plain[1], torch.tensor([[2.0]]))
    with pytest.raises(ValueError):
        fedavg([a, b], [0, 0])


def test_layer_of_reads_both_families_names():
    assert layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == 3
    assert layer_of("base_model.model.transformer.h.11.attn.c_attn.lora_B.default.weight") == 11
    assert layer_of("base_model.model.score.modules_to_save.default.weight") is None


def _round(tiny_model, ffa: bool):
    """One FedAvg round of two clients (2 local steps each) with shard sizes 10 and 30."""
    torch.manual_seed(0)
    model = whole_model(tiny_model("llama"))
    method = FedLoRA(model, OptimSettings(lr=5e-2), {"a": 10, "b": 30}, local_steps=2, ffa=ffa)
    for i, device in enumerate(["a", "a", "b", "b"]):
        method.after_step(method.step(token_batch(device, seed=i)))
    assert method.rounds == 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    module = "layers.1.self_attn.q_proj"

    def factor(values, kind):
        if kind == "lora_A" and ffa:  # frozen: one shared value, not among the trained parameters
            return next(p for n, p in model.named_parameters() if module in n and "lora_A" in n).detach()
        return values[next(i for i, n in enumerate(names) if module in n and kind in n)]

    per_client = {d: factor(method.clients.states[d], "lora_B") @ factor(method.clients.states[d], "lora_A") for d in "ab"}
    average_of_models = 0.25 * per_client["a"] + 0.75 * per_client["b"]
    model_of_average = factor(method.global_state, "lora_B") @ factor(method.global_state, "lora_A")
    return average_of_models, model_of_average


def test_ffa_lora_average_is_the_average_model_and_plain_fedlora_is_not(tiny_model):
    avg_models, model_of_avg = _round(tiny_model, ffa=True)
    assert avg_models.abs().max() > 1e-4, "the round changed the adapter"
    assert torch.allclose(avg_models, model_of_avg, atol=1e-7)
    avg_models, model_of_avg = _round(tiny_model, ffa=False)
    assert (avg_models - model_of_avg).abs().max() > 1e-6, "mean(B)·mean(A) is not the mean of B·A"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_splitlora_sends_the_unsplit_models_gradient_at_the_cut(family, tiny_model):
    torch.manual_seed(0)
    model = whole_model(tiny_model(family))
    with torch.no_grad():  # non-zero B factors, so the device's LoRA changes the activations
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    for m in model.modules():  # GPT-2's own dropout would make the two forwards differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    method = SplitLoRA(model, 2, OptimSettings(lr=0.0), {"d": 6}, aggregate_every=0)
    batch = token_batch("d", seed=1)
    result = method.step(batch)

    # The reference: transformers' own forward of the unsplit peft model, the gradient at block 2's input.
    captured = {}

    def keep_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        captured["hidden"] = hidden

    layers = model.adapter.layers(model.adapter.backbone(model.peft_model))
    handle = layers[2].register_forward_pre_hook(keep_input, with_kwargs=True)
    model.eval()
    logits = model.peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits, batch.labels)
    loss.backward()
    assert abs(float(loss.detach()) - result.loss) < 1e-5
    assert captured["hidden"].grad.abs().max() > 0
    assert torch.allclose(method.last_cut_gradient, captured["hidden"].grad, atol=1e-6)


def test_interleave_keeps_devices_in_step_by_their_share_of_samples():
    # a: 4 batches of 2 samples; b: 2 batches of 4; c: 1 batch of 3.
    order = interleave({"a": [(i, 2) for i in range(4)], "b": [(0, 4), (1, 4)], "c": [(0, 3)]})
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("a", 2), ("b", 1), ("a", 3)]


def test_streamed_run_and_in_process_run_give_the_same_losses(tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    from cli_helpers import spawn
    from sftool.runtime.local_data import read_examples
    from sftool.server.serve import ServeOptions, serve_in_process
    from sftool.training.run_logger import read_metrics
    from sftool.training.sources import SimulatedDevice

    artifacts = tiny_artifacts("llama")
    shards = device_shards(90, only_labels=(0, 1))
    common = dict(batch_size=8, mix_capacity=24, seed=3, lr=3e-3)
    endpoint = f"tcp://127.0.0.1:{free_port}"
    server = spawn("serve", "--model", tiny_model("llama"), "--artifacts", artifacts, "--bind", endpoint,
                   "--out", tmp_path / "streamed", "--devices", "2", "--batch-size", common["batch_size"],
                   "--mix-capacity", common["mix_capacity"], "--seed", common["seed"], "--lr", common["lr"],
                   "--lora-dropout", "0", "--log-samples", "--threads", "1")
    devices = [spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", f"dev{i}",
                     "--precision", "fp32", "--batch-size", "4", "--epochs", "2", "--threads", "1")
               for i, shard in enumerate(shards)]
    for proc in devices + [server]:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out

    opts = ServeOptions(source=str(tiny_model("llama")), artifacts=[artifacts], out=tmp_path / "in-process", devices=2,
                        batch_size=common["batch_size"], mix_capacity=common["mix_capacity"], seed=common["seed"],
                        lora=LoraSettings(dropout=0.0), optim=OptimSettings(lr=common["lr"]), threads=1, log_samples=True)
    simulated = [SimulatedDevice(f"dev{i}", read_examples(shard), 4, 2) for i, shard in enumerate(shards)]
    serve_in_process(opts, simulated, "fp32", log_line=lambda m: None)

    def steps(run):
        return [r for r in read_metrics(run) if "correct" in r]

    streamed, in_process = steps(tmp_path / "streamed"), steps(tmp_path / "in-process")
    assert len(streamed) == len(in_process) == -(-2 * 2 * 90 // 8)
    assert [r["samples"] for r in streamed] == [r["samples"] for r in in_process], "same samples, same order"
    assert [r["loss"] for r in streamed] == pytest.approx([r["loss"] for r in in_process], abs=1e-6)
    summary = json.loads((tmp_path / "in-process" / "summary.json").read_text())
    assert summary["samples_trained"] == 2 * 2 * 90 and summary["device_compute_s"] > 0


def test_federated_rounds_run_until_the_budget_whatever_the_shard_sizes():
    from itertools import islice

    from sftool.runtime.local_data import Example
    from sftool.training.sources import SimulatedDevice, rounds

    big = SimulatedDevice("big", [Example(i, "x", 0) for i in range(40)], 8)
    small = SimulatedDevice("small", [Example(100 + i, "x", 1) for i in range(3)], 8)
    big.batches, small.batches = [list(range(i, i + 8)) for i in range(0, 40, 8)], [[0, 1, 2]]
    order = list(islice(rounds([big, small], None, 2), 12))  # endless: the budget decides
    assert order[:4] == [("big", 0), ("big", 1), ("small", 0), ("small", 1)]
    assert order[4:8] == [("big", 2), ("big", 3), ("small", 2), ("small", 3)]
    assert small.rows(3) == (3, [small.examples[0], small.examples[1], small.examples[2]])  # cycling: epoch 3
    assert list(rounds([big, small], 1, 2)) == order[:4]
