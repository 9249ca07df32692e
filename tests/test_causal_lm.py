"""The causal-LM task on the training core: loss on the answer tokens only, the split model equals
the unsplit causal LM, training moves it, and the adapter loads with plain peft on
``AutoModelForCausalLM`` with the same logits."""

from __future__ import annotations

import math

import pytest
import torch
from sftool.server.mixing import Sample, collate
from sftool.server.split_model import SplitModelSpec, SplitServerModel
from sftool.server.trainer import Trainer
from sftool.settings import LoraSettings, OptimSettings
from sftool.training.task import IGNORE_INDEX, CausalLMTask, answer_labels


def test_only_the_answer_tokens_count_on_a_hand_made_example():
    task = CausalLMTask(vocab_size=2)
    labels = task.labels_tensor([answer_labels([0, 1, 1, 0], prompt_tokens=2)])
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 1, 0]]
    # Position t predicts token t+1. Positions 1 and 2 predict the two answer tokens with logits (0, 0):
    # log 2 each. Position 0 predicts a prompt token and position 3 nothing: their logits are absurd,
    # and the loss would show it if either counted.
    logits = torch.tensor([[[100.0, -100.0], [0.0, 0.0], [0.0, 0.0], [-100.0, 100.0]]])
    assert task.loss(logits, labels).item() == pytest.approx(math.log(2))
    score = task.score(logits, labels)
    assert score.count == 2 and score.loss == pytest.approx(math.log(2))


def test_token_labels_are_padded_with_the_ignore_index_when_samples_are_mixed():
    h = torch.zeros(3, 4)
    short = Sample(h[:2], torch.ones(2, dtype=torch.long), torch.tensor([IGNORE_INDEX, 7]), "a", 0, 0, 0)
    long = Sample(h, torch.ones(3, dtype=torch.long), torch.tensor([IGNORE_INDEX, 5, 6]), "b", 1, 0, 0)
    batch = collate([short, long])
    assert batch.labels.tolist() == [[IGNORE_INDEX, 7, IGNORE_INDEX], [IGNORE_INDEX, 5, 6]]
    assert batch.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_the_split_causal_lm_trains_and_its_adapter_loads_with_plain_peft(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    unsplit = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    task = CausalLMTask(vocab_size=unsplit.config.vocab_size)
    torch.manual_seed(0)
    model = SplitServerModel(SplitModelSpec(str(folder), task, [2], pad_token_id=0, lora=LoraSettings(dropout=0.0)))
    ids = torch.tensor([[5, 9, 11, 13, 17, 19], [6, 8, 10, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    real = mask.bool()

    with torch.no_grad():  # LoRA starts at zero: the split model is the pretrained causal LM
        torch.testing.assert_close(model.full_forward(ids, mask)[real], unsplit(input_ids=ids, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=1e-5)

    labels = task.labels_tensor([answer_labels(ids[0].tolist(), 3), answer_labels(ids[1, :4].tolist(), 2)])
    labels = torch.cat([labels, torch.full((2, 6 - labels.shape[1]), IGNORE_INDEX)], 1)
    with torch.no_grad():
        hidden = model.device_forward(ids, mask, 2)  # what a device at split 2 would send
    trainer = Trainer(model, OptimSettings(lr=1e-2, warmup_steps=1))
    losses = [trainer.step_with(lambda: model(hidden, mask), labels).loss for _ in range(30)]
    # The tiny random model's frozen final norm and tied head cap how confident it can get (its loss
    # stays near 3 here), but the answer-token loss must fall.
    assert losses[-1] < losses[0] - 0.8, losses

    model.save_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                       tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits[real], model.full_forward(ids, mask)[real],
                                   atol=1e-4, rtol=1e-4)


def test_a_device_encodes_prompt_and_answer_with_labels_on_the_answer_alone(tiny_model, tmp_path):
    import json

    from sftool.runtime.local_data import TextEncoder, encode_with_answers, read_prompt_answer

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"id": 7, "question": "w1 w2 w3", "answer": "good movie"}) + "\n")
    [example] = read_prompt_answer(data, template="w0 {prompt}")
    assert (example.sample_id, example.text, example.answer) == (7, "w0 w1 w2 w3", "good movie")
    tokenizer = tiny_model("llama") / "tokenizer.json"
    ids, mask, labels = encode_with_answers(TextEncoder(tokenizer, 16, 0), [example.text], [example.answer], eos_token_id=2)
    # vocabulary: <pad> <unk> <eos> w0 w1 ... (w_i = 3 + i), good = 59, movie = 61
    assert ids.tolist() == [[3, 4, 5, 6, 59, 61, 2]] and mask.tolist() == [[1] * 7]
    assert labels.tolist() == [[IGNORE_INDEX] * 4 + [59, 61, 2]]
    # Too long: the prompt loses its start, the answer is kept whole.
    ids, _, labels = encode_with_answers(TextEncoder(tokenizer, 5, 0), [example.text], [example.answer], eos_token_id=2)
    assert ids.tolist() == [[5, 6, 59, 61, 2]] and labels.tolist() == [[IGNORE_INDEX] * 2 + [59, 61, 2]]
