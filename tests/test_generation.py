"""Generation through the split: the ONNX device decoder with its cache equals the full forward, split
greedy (and seeded sampled) decoding equals the unsplit transformers model token for token, with and
without a LoRA adapter from a run folder; the stop rule; GSM8K exact-match parsing; CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_cli
from sftool.errors import SftoolError
from sftool.generation.loop import generate
from sftool.generation.sampling import Sampler, StopRule
from sftool.gsm8k import answer_line_completed, exact_match, final_number
from tiny_models import make_tiny_model

SPLIT = 2
PROMPT = "w1 w2 w3 good movie w7"


@pytest.fixture(scope="module")
def varied_llama(tmp_path_factory):
    """The tiny random Llama with larger weights: greedy decoding of the stock one repeats one token, which
    would let a broken cache pass; this one wanders over the vocabulary."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path_factory.mktemp("varied-llama"), "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder_export(varied_llama, tmp_path_factory):
    from sftool.exporters.onnx_export import ExportOptions, export_device

    out = tmp_path_factory.mktemp("decoder-export") / "artifacts"
    export_device(ExportOptions(str(varied_llama), SPLIT, out, max_seq_len=64, with_decoder=True), log=lambda m: None)
    return out


def _lora_run(model_folder, run_dir, layers):
    """A run folder whose adapter has LoRA on ``layers`` with random (nonzero) B factors."""
    from sftool.run_folder import write_run_record
    from sftool.server.split_model import SplitModelSpec, SplitServerModel
    from sftool.settings import LoraSettings
    from sftool.training.task import CausalLMTask

    torch.manual_seed(3)
    model = SplitServerModel(SplitModelSpec(str(model_folder), CausalLMTask(vocab_size=59), [SPLIT], pad_token_id=0,
                                            lora=LoraSettings(dropout=0.0), lora_layers=layers))
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_adapter(run_dir / "adapter")
    write_run_record(run_dir, {"source": str(model_folder), "artifacts": [], "options": {}})
    return run_dir


def test_the_onnx_decoder_with_its_cache_equals_the_full_forward(varied_llama, decoder_export):
    from sftool.exporters.families import adapter_for
    from sftool.exporters.partition import DevicePart
    from sftool.runtime.decoder_session import DecoderSession
    from sftool.runtime.manifest import load_manifest
    from transformers import AutoModelForCausalLM

    manifest = load_manifest(decoder_export)
    assert manifest.decoder.file in manifest.files and manifest.decoder.blocks == SPLIT
    parity = manifest.decoder.parity
    assert parity["max_abs_diff"] < 1e-5 * max(1.0, parity["ref_max_abs"]), parity
    model = AutoModelForCausalLM.from_pretrained(varied_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    part = DevicePart(adapter_for("llama"), model.model, SPLIT).eval()

    rng = np.random.default_rng(5)
    ids = rng.integers(3, 59, size=(2, 14), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded prompt beside a full one
    with torch.no_grad():
        full = part(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    session = DecoderSession.open(decoder_export, manifest)
    for prompt_len in (6, 1):  # a prompt, and one token alone
        session.reset()
        pieces = [session.run(ids[:, :prompt_len], mask[:, :prompt_len])]
        pieces += [session.run(ids[:, t : t + 1], mask[:, t : t + 1]) for t in range(prompt_len, ids.shape[1])]
        assert session.length == ids.shape[1]
        got = np.concatenate(pieces, axis=1)
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], full[real], atol=1e-5 * max(1.0, np.abs(full).max()), rtol=0)
        assert not got[~real].any()  # padding positions are exact zeros, as in device.onnx


def test_an_export_without_a_decoder_is_refused_for_the_split_path(tmp_path, tiny_artifacts):
    from sftool.generation.setup import build_setup
    from sftool.runtime.manifest import load_manifest

    assert load_manifest(tiny_artifacts("llama")).decoder is None  # manifests without the field still load
    with pytest.raises(SftoolError, match="--with-decoder"):
        build_setup(tiny_artifacts("llama"), paths=["split"], log=lambda m: None)


def _generate_both(setup, sampler_args=(), max_new_tokens=24):
    ids = setup.prompt_ids(PROMPT)
    stop = StopRule.of([])
    return {path: generate(setup.decoders[path], ids, setup.decode, max_new_tokens, Sampler(*sampler_args), stop)
            for path in ("split", "unsplit")}


def test_split_greedy_decoding_equals_unsplit_greedy_decoding(decoder_export, varied_llama):
    from sftool.generation.setup import build_setup

    setup = build_setup(decoder_export, paths=["split", "unsplit"], log=lambda m: None)
    out = _generate_both(setup)
    assert out["split"].tokens == out["unsplit"].tokens
    assert len(set(out["split"].tokens)) >= 6, out["split"].tokens  # not one token repeated
    # The logits themselves, not only their argmax, after a prefill and a cached step.
    ids = setup.prompt_ids(PROMPT)
    for path in ("split", "unsplit"):
        setup.decoders[path].prefill(ids)
    split_logits = setup.decoders["split"].step(out["split"].tokens[0])
    unsplit_logits = setup.decoders["unsplit"].step(out["split"].tokens[0])
    np.testing.assert_allclose(split_logits, unsplit_logits, atol=1e-4, rtol=0)
    # Seeded sampling draws the same tokens on both paths.
    sampled = _generate_both(setup, (1.0, 0.9, 7))
    assert sampled["split"].tokens == sampled["unsplit"].tokens != out["split"].tokens


def test_split_decoding_with_a_run_adapter_equals_plain_peft(decoder_export, varied_llama, tmp_path):
    from sftool.generation.setup import build_setup

    run = _lora_run(varied_llama, tmp_path / "run", layers=[2, 3])
    tuned = build_setup(decoder_export, run=run, paths=["split", "unsplit"], log=lambda m: None)
    out = _generate_both(tuned)
    assert out["split"].tokens == out["unsplit"].tokens
    base = build_setup(decoder_export, paths=["unsplit"], log=lambda m: None)
    ids = base.prompt_ids(PROMPT)
    plain = generate(base.decoders["unsplit"], ids, base.decode, 24, Sampler(), StopRule.of([]))
    assert plain.tokens != out["split"].tokens  # the adapter changes what is generated

    device_tuned = _lora_run(varied_llama, tmp_path / "run-device", layers=[1, 2, 3])
    with pytest.raises(SftoolError, match="device side of split 2"):
        build_setup(decoder_export, run=device_tuned, paths=["split"], log=lambda m: None)


class ScriptedModel:
    """A next-token model that always prefers the next token of a script (the loop and stop rule are
    under test here, not a model)."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.step_seconds, self.i = script, vocab, {}, 0

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script[min(self.i, len(self.script) - 1)]] = 5.0
        self.i += 1
        return logits

    def prefill(self, prompt_ids):
        self.i = 0
        return self._logits()

    def step(self, token):
        return self._logits()


PIECES = ["So", " 3", "+", "4", "=", "7", "\n", "####", " 1", ",", "2", "0", "0", "\n", " more", "<eos>", " 5"]


def _run_script(script, eos=(), answer_line=True, max_new_tokens=40):
    decode = lambda tokens: "".join(PIECES[t] for t in tokens if PIECES[t] != "<eos>")  # noqa: E731
    model = ScriptedModel(script, len(PIECES))
    return generate(model, [0], decode, max_new_tokens, Sampler(), StopRule.of(eos, answer_line))


def test_generation_stops_once_the_answer_line_is_complete():
    # "#### 1,2" is not done (the number may go on): the newline after "1,200" completes it.
    result = _run_script(list(range(1, 15)))
    assert result.stop == "answer" and result.text == " 3+4=7\n#### 1,200\n"
    assert final_number(result.text) == "1200"
    assert _run_script(list(range(1, 15)), answer_line=False, max_new_tokens=14).stop == "length"
    assert _run_script([1, 2, 15, 16], eos=[15]).tokens == [1, 2, 15]  # EOS ends it, and is the last token
    for text, done in [("#### 18", False), ("#### 1,", False), ("#### 18\n", True), ("#### 18.\n", True),
                       ("#### $5 ", True), ("no answer\n", False), ("#### \n", False)]:
        assert answer_line_completed(text) is done, text


def test_exact_match_reads_real_gsm8k_answers():
    # Answers in the data set's own format (worked steps with calculator annotations, then "#### N").
    house = ("The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
             "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000")
    assert final_number(house) == "70000"
    assert final_number("She pays 2,125/5=<<2125/5=425>>425 a month\n#### 2,125") == "2125"
    assert exact_match("So she makes $18.00 every day.\n#### 18", "Janet sells 9 eggs... 9 * 2 = $<<9*2=18>>18\n#### 18")
    assert exact_match("The answer is $70,000.", house)  # no marker: the last number
    assert exact_match("#### 18.0 dollars, not 20", "#### 18")  # the marker wins over later numbers
    assert not exact_match("#### 17", "#### 18") and not exact_match("I do not know", "#### 18")
    assert final_number("The temperature fell to -4 degrees") == "-4" and final_number("#### 0.50") == "0.5"


def test_sampler_rules():
    logits = np.array([0.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler().choose(logits) == 1
    assert Sampler(1.0, top_p=1e-6, seed=0).choose(logits) == 1  # the nucleus is the top token alone
    draws = [Sampler(1.0, 0.95, seed=11).choose(logits) for _ in range(2)]
    assert draws[0] == draws[1]
    sampler = Sampler(1.0, 0.8, seed=0)
    assert {sampler.choose(logits) for _ in range(200)} == {1, 2}  # 0 and 3 are outside the top-0.8 nucleus
    with pytest.raises(SftoolError):
        Sampler(-1.0)


def test_generate_cli_one_line_errors(tiny_artifacts, decoder_export, tmp_path):
    assert "--with-decoder" in one_line_error(run_cli("generate", "--artifacts", tiny_artifacts("llama"), "--prompt", "w1"))
    assert "--temperature" in one_line_error(run_cli("generate", "--artifacts", decoder_export, "--prompt", "w1",
                                                     "--temperature", "-1"))
    assert "one of --prompt" in one_line_error(run_cli("generate", "--artifacts", decoder_export))
    assert "no such data file" in one_line_error(run_cli("generate", "--artifacts", decoder_export, "--data",
                                                         tmp_path / "none.jsonl", "--eval"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "w1 w2"}) + "\n")
    assert "no field 'answer'" in one_line_error(run_cli("generate", "--artifacts", decoder_export, "--data", bad,
                                                         "--eval", "--max-new-tokens", "4"))


def test_generate_cli_evaluates_both_paths(decoder_export, varied_llama, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"w{i} w{i + 1} good", "answer": f"w{i + 2} plot"}) + "\n"
                            for i in range(3)))
    run = _lora_run(varied_llama, tmp_path / "run", layers=[2, 3])
    out = tmp_path / "eval.json"
    result = run_cli("generate", "--artifacts", decoder_export, "--run", run, "--data", data, "--eval",
                     "--max-new-tokens", "12", "--out", out)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["summary"]["n"] == 3 and written["summary"]["tokens_equal"] == 1.0
    assert written["loss"]["split"]["answer_tokens"] == 3 * 3  # two answer words and EOS per row
    assert written["loss"]["split"]["loss"] == pytest.approx(written["loss"]["unsplit"]["loss"], abs=1e-4)
    assert "split vs unsplit: equal token for token on 100.0% of rows" in result.output


def test_families_without_cached_blocks_say_so(tiny_model):
    from sftool.exporters.families import adapter_for
    from sftool.exporters.kv_cache import KeyValueCache
    from sftool.exporters.partition import DevicePart
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("gpt2"), dtype=torch.float32).eval()
    part = DevicePart(adapter_for("gpt2"), model.transformer, SPLIT)
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(SftoolError, match="not supported yet for the gpt2 family"):
        part.decode(ids, torch.ones_like(ids), KeyValueCache())


def test_plain_generation_over_a_data_file_scores_nothing(decoder_export, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"question": "w3 w4 good"}) + "\n" + json.dumps({"question": "w5 plot"}) + "\n")
    out = tmp_path / "gen.json"
    result = run_cli("generate", "--artifacts", decoder_export, "--data", data, "--max-new-tokens", "5", "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(len(r["split"]["tokens"]) == 5 and "exact_match" not in r["split"] for r in rows)


def test_prompts_take_the_given_template_else_the_runs(decoder_export, varied_llama, tmp_path):
    from sftool.generation.setup import build_setup
    from sftool.run_config import RUN_CONFIG

    given = build_setup(decoder_export, paths=["unsplit"], prompt_template="w0 {prompt}", log=lambda m: None)
    assert given.template == "w0 {prompt}"
    run = _lora_run(varied_llama, tmp_path / "run", layers=[2, 3])
    (run / RUN_CONFIG).write_text('[model]\nsource = "x"\n[task]\ntask = "causal-lm"\nprompt_template = "Q: {prompt}\\nA:"\n')
    assert build_setup(decoder_export, run=run, paths=["unsplit"], log=lambda m: None).template == "Q: {prompt}\nA:"
    with pytest.raises(SftoolError, match="slot"):
        build_setup(decoder_export, paths=["unsplit"], prompt_template="no slot", log=lambda m: None)
