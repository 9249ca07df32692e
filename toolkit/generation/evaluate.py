"""GSM8K evaluation through the split and through the unsplit model: exact match of the final number
(greedy or sampled generation), and the answer-token loss and perplexity of the worked answers.

Both paths see the same rendered prompts and the same token ids; their generations are compared token
for token. The loss uses the task's own scoring (``CausalLMTask.score``) on the rows ``encode_with_answers``
builds, as training does: through the split, the export's ``device.onnx`` (fp32) and the server blocks;
unsplit, the transformers model with the adapter attached by peft.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from sftool.errors import SftoolError
from sftool.generation.loop import Generation, generate
from sftool.generation.sampling import Sampler, StopRule
from sftool.generation.setup import GenerationSetup
from sftool.gsm8k import exact_match, final_number
from sftool.runtime.local_data import Example, read_prompt_answer

#: Built-in data sets ``--data`` may name: their fixed re-split's eval part.
BUILTIN_EVAL = ("gsm8k",)


def read_prompts(data: str, template: str | None, prompt_fields: Sequence[str] = ("question",),
                 answer_field: str | None = "answer", id_field: str = "id", limit: int | None = None) -> list[Example]:
    """Prompt/answer rows of a JSONL/CSV file, or of a built-in data set's eval split (``gsm8k``), through
    the one reader (``read_prompt_answer``), rendered with ``template``. Without ``answer_field`` the rows
    need no answer (plain generation)."""
    if limit is not None and limit < 1:
        raise SftoolError("--limit must be >= 1")
    # Plain generation reads the prompt field as the (unused) answer: the reader then checks the rows alone.
    answer = answer_field or prompt_fields[0]
    if data in BUILTIN_EVAL:
        from sftool.datasets import load_split, write_jsonl

        with tempfile.TemporaryDirectory() as tmp:
            path = write_jsonl(load_split(data).eval, Path(tmp) / f"{data}-eval.jsonl")
            examples = read_prompt_answer(path, prompt_fields, answer, id_field, template)
    else:
        examples = read_prompt_answer(Path(data), prompt_fields, answer, id_field, template)
    if answer_field is None:
        examples = [replace(e, answer=None) for e in examples]
    return examples[:limit] if limit else examples


def _standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def generate_rows(
    setup: GenerationSetup, examples: Sequence[Example], paths: Sequence[str], max_new_tokens: int,
    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, answer_line: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Generate every example on every path (each path its own sampler, same seed); one dict per row."""
    stop = StopRule.of(setup.eos_token_ids, answer_line)
    samplers = {path: Sampler(temperature, top_p, seed) for path in paths}
    rows = []
    for example in examples:
        ids = setup.prompt_ids(example.text)
        if len(ids) + max_new_tokens > setup.max_positions:
            raise SftoolError(f"sample {example.sample_id}: {len(ids)} prompt tokens + {max_new_tokens} new exceed the "
                              f"model's {setup.max_positions} positions")
        row: dict = {"id": example.sample_id}
        outs: dict[str, Generation] = {}
        for path in paths:
            outs[path] = generate(setup.decoders[path], ids, setup.decode, max_new_tokens, samplers[path], stop)
            row[path] = outs[path].as_dict()
        if len(paths) == 2:
            row["tokens_equal"] = outs[paths[0]].tokens == outs[paths[1]].tokens
        if example.answer is not None:
            row["reference"] = final_number(example.answer)
            for path in paths:
                row[path]["prediction"] = final_number(outs[path].text)
                row[path]["exact_match"] = exact_match(outs[path].text, example.answer)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def summarize_rows(rows: Sequence[dict], paths: Sequence[str]) -> dict:
    """Exact match (with its standard error) per path, and how often the paths agree."""
    n = len(rows)
    out: dict = {"n": n}
    for path in paths:
        if rows and "exact_match" in rows[0][path]:
            em = sum(r[path]["exact_match"] for r in rows) / n
            out[f"{path}_exact_match"] = em
            out[f"{path}_exact_match_se"] = _standard_error(em, n)
        out[f"{path}_new_tokens"] = sum(len(r[path]["tokens"]) for r in rows)
    if len(paths) == 2 and rows:
        out["tokens_equal"] = sum(r["tokens_equal"] for r in rows) / n
        if "prediction" in rows[0][paths[0]]:
            out["same_prediction"] = sum(r[paths[0]]["prediction"] == r[paths[1]]["prediction"] for r in rows) / n
    return out


def answer_token_loss(setup: GenerationSetup, examples: Sequence[Example], paths: Sequence[str],
                      batch_size: int = 8, log: Callable[[str], None] | None = None) -> dict:
    """Mean cross-entropy over the answer tokens (and EOS) per path, its perplexity, and the standard error
    of the per-sample mean loss."""
    import numpy as np
    import torch
    from sftool.runtime.local_data import TextEncoder, encode_with_answers
    from sftool.runtime.onnx_model import DeviceModel, choose_variant
    from sftool.training.task import CausalLMTask

    if any(e.answer is None for e in examples):
        raise SftoolError("the answer-token loss needs an answer on every row")
    manifest = setup.manifest
    encoder = TextEncoder(setup.artifacts / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
    task = CausalLMTask(vocab_size=int(setup.unsplit_model.config.vocab_size) if setup.unsplit_model is not None
                        else int(setup.server.config.vocab_size))
    device = None
    if "split" in paths:
        device = DeviceModel(setup.artifacts, manifest, choose_variant(manifest, "fp32"))
    eos = setup.eos_token_ids[0] if setup.eos_token_ids else None
    per_sample: dict[str, list[float]] = {p: [] for p in paths}
    totals = {p: [0.0, 0] for p in paths}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask, labels = encode_with_answers(encoder, [e.text for e in chunk], [e.answer for e in chunk], eos)
        labels_t = torch.from_numpy(labels)
        for path in paths:
            with torch.no_grad():
                if path == "split":
                    server = setup.server
                    hidden = torch.from_numpy(device.forward(ids, mask)).to(server.device)
                    logits = server(hidden, torch.from_numpy(mask).to(server.device)).cpu()
                else:
                    model = setup.unsplit_model
                    target = next(model.parameters()).device
                    logits = model(input_ids=torch.from_numpy(ids).to(target),
                                   attention_mask=torch.from_numpy(mask).to(target)).logits.cpu()
            for r in range(len(chunk)):
                score = task.score(logits[r : r + 1], labels_t[r : r + 1])
                totals[path][0] += score.loss_sum
                totals[path][1] += score.count
                per_sample[path].append(score.loss)
        if log:
            log(f"loss: {min(start + batch_size, len(examples))}/{len(examples)} rows")
    out: dict = {"rows": len(examples)}
    for path in paths:
        loss = totals[path][0] / totals[path][1]
        samples = np.asarray(per_sample[path], dtype=np.float64)
        out[path] = {"loss": loss, "perplexity": math.exp(loss), "answer_tokens": totals[path][1],
                     "sample_loss_se": float(samples.std(ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else None}
    return out

