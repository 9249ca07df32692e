"""The privacy audit's attacks and the device-side noise, on tiny random models and real components
(onnxruntime sessions, a real device process over ZeroMQ loopback to the real receiver)."""

from __future__ import annotations

import json
import math
import queue
import time

import numpy as np
import pytest
from cli_helpers import one_line_error, run_cli, spawn, torch_blocked_env
from sftool.privacy.bleu import sentence_bleu
from sftool.privacy.nearest_neighbour import nearest_neighbour_attack
from sftool.privacy.target import AttackTarget
from sftool.runtime.activation_noise import NoiseDefense, gaussian_delta, gaussian_epsilon, parse_defense
from sftool.runtime.profiler import privacy_floor
from tiny_models import synthetic_rows, write_jsonl

TEXTS = [r["text"] for r in synthetic_rows(4, seed=3)]


def _recovery(target: AttackTarget, shortlist: int | None = None) -> float:
    sentences = target.observe(TEXTS)
    guesses = [nearest_neighbour_attack(target, s, shortlist=shortlist) for s in sentences]
    return float(np.mean(np.concatenate([g.predicted == s.ids for g, s in zip(guesses, sentences)])))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_nearest_neighbour_recovers_every_token_at_k0_and_reports_k1(family, tiny_model, capsys):
    assert _recovery(AttackTarget.from_model(str(tiny_model(family)), 0)) == 1.0
    at_k1 = _recovery(AttackTarget.from_model(str(tiny_model(family)), 1))
    with capsys.disabled():
        print(f"\n{family}: nearest-neighbour full sweep at k=1 recovers {at_k1:.1%} of tokens")
    assert at_k1 > 0.5


def test_the_shadow_part_gives_the_exported_onnx_output(tiny_artifacts):
    target = AttackTarget.from_export(tiny_artifacts("llama"))
    ids = np.array(target.encoder.token_ids([TEXTS[0]])[0])
    import torch

    with torch.no_grad():
        shadow = target.shadow_forward(torch.from_numpy(ids[None]))[0].numpy()
    assert np.abs(shadow - target.onnx_model.forward(ids[None], np.ones((1, ids.size), np.int64))[0]).max() < 1e-4


def test_recovery_is_monotone_or_flat_in_noise(tiny_model):
    rates = [_recovery(AttackTarget.from_model(str(tiny_model("llama")), 1, defense=NoiseDefense(ratio=r, seed=0)))
             for r in (0.0, 1.0, 4.0, 16.0)]
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:])), rates
    assert rates[-1] < rates[0], rates


def test_noise_has_the_configured_norm_ratio_and_clip_bounds_every_token():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 5, 256)).astype(np.float32) * np.array([1, 30], np.float32)[:, None, None]
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    noisy = NoiseDefense(ratio=0.3).apply(hidden, mask, np.random.default_rng(2))
    real = mask.astype(bool)
    ratios = np.linalg.norm((noisy - hidden)[real], axis=-1) / np.linalg.norm(hidden[real], axis=-1)
    assert np.allclose(ratios, 0.3, rtol=0.15), ratios
    assert (noisy[~real] == hidden[~real]).all()
    clipped = NoiseDefense(clip=2.0).apply(hidden, mask, np.random.default_rng(2))
    assert (np.linalg.norm(clipped[real], axis=-1) <= 2.0 + 1e-5).all()
    assert parse_defense(NoiseDefense(clip=2.0, sigma=1.5).wire()) == NoiseDefense(clip=2.0, sigma=1.5)


def test_gaussian_epsilon_meets_delta_and_is_tighter_than_the_classical_bound():
    delta = 1e-5
    eps = gaussian_epsilon(sigma=40.0, tokens=4)
    mu = 2 * math.sqrt(4) / 40.0
    assert gaussian_delta(eps, mu) <= delta * 1.0001
    assert gaussian_delta(eps * 0.99, mu) > delta
    # Dwork and Roth, Theorem A.1 (valid for eps < 1): noise std = sensitivity * sqrt(2 ln(1.25/delta)) / eps.
    classical = mu * math.sqrt(2 * math.log(1.25 / delta))
    assert classical < 1 and eps < classical
    assert gaussian_epsilon(80.0, 4) < eps < gaussian_epsilon(40.0, 4, releases=2)


def test_sentence_bleu_is_one_for_a_copy_and_falls_with_errors():
    ref = "a charming and often affecting journey".split()
    assert sentence_bleu(ref, ref) == pytest.approx(1.0)
    one_wrong = sentence_bleu(ref, "a charming and often moving journey".split())
    assert 0 < sentence_bleu(ref, "the dull and never moving trip".split()) < one_wrong < 1


def test_the_device_process_sends_noised_activations_and_says_so_in_hello(tiny_artifacts, tmp_path):
    from sftool.runtime.local_data import TextEncoder, read_examples
    from sftool.runtime.manifest import load_manifest, manifest_sha256
    from sftool.runtime.onnx_model import DeviceModel, choose_variant
    from sftool.server.receiver import AcceptedSplit, Receiver

    folder = tiny_artifacts("llama")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    data = write_jsonl(synthetic_rows(12, seed=4), tmp_path / "device.jsonl")
    batches: queue.Queue = queue.Queue()
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, batches,
                        window=4, goodbye_grace_s=0.2)
    receiver.start()
    try:
        proc = spawn("device", "--artifacts", folder, "--connect", receiver.endpoint, "--data", data, "--device-id", "d0",
                     "--batch-size", "4", "--wire-dtype", "fp32", "--noise-ratio", "0.5", "--connect-timeout", "30",
                     env=torch_blocked_env(tmp_path))
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        deadline = time.monotonic() + 10
        while "d0" not in receiver.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.sessions["d0"].defense == "gauss:ratio=0.5"
    finally:
        receiver.request_stop("test over")
        receiver.join_stopped(5)
    texts = {e.sample_id: e.text for e in read_examples(data)}
    model = DeviceModel(folder, manifest, choose_variant(manifest, "fp32"))
    encoder = TextEncoder(folder / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
    ratios, received = [], 0
    while not batches.empty():
        batch = batches.get().batch
        ids, mask = encoder.encode([texts[int(i)] for i in batch.sample_ids])
        clean = model.forward(ids, mask)
        real = mask.astype(bool)
        assert (batch.attention_mask.astype(bool) == real).all()
        diff = np.linalg.norm((batch.hidden - clean)[real], axis=-1)
        ratios.append(diff / np.linalg.norm(clean[real], axis=-1))
        received += len(batch.sample_ids)
    assert received == 12
    ratios = np.concatenate(ratios)
    # H = 64 on the tiny model: the per-token ratio scatters by about 1/sqrt(2H) around 0.5.
    assert abs(ratios.mean() - 0.5) < 0.03 and ratios.min() > 0.3, ratios


def test_audit_writes_results_and_bad_input_is_one_line(tiny_artifacts, tmp_path):
    folder = tiny_artifacts("gpt2")
    data = write_jsonl(synthetic_rows(3, seed=5), tmp_path / "private.jsonl")
    public = write_jsonl(synthetic_rows(30, seed=6), tmp_path / "public.jsonl")
    out = tmp_path / "audit"
    result = run_cli("audit", "privacy", "--artifacts", folder, "--data", data, "--public", public, "--sentences", "3",
                     "--shortlist", "0", "--optimisation-sentences", "1", "--optimisation-steps", "20", "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "privacy_audit.json").read_text())
    (row,) = results["splits"]
    assert row["attacks"]["nearest_neighbour"]["full_sweep"] and row["recovery_rate"] >= row["attacks"]["inverter"]["exact"]
    assert (out / f"privacy_split{row['split']}.png").is_file()
    assert privacy_floor(out / "privacy_audit.json", 0.5).rates == {row["split"]: row["recovery_rate"]}
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"splits": [{"split": k, "recovery_rate": r} for k, r in ((2, 0.9), (6, 0.1), (4, 0.3))]}))
    assert privacy_floor(several, 0.5).recommended == 4 and privacy_floor(several, 0.05).recommended is None
    profiled = run_cli("profile", "--artifacts", folder, "--budget-ms", "100000", "--privacy-floor", "1.0",
                       "--audit", out / "privacy_audit.json")
    assert profiled.exit_code == 0 and "privacy floor 100.0%" in profiled.output, profiled.output
    assert "missing.jsonl" in one_line_error(run_cli("audit", "privacy", "--artifacts", folder, "--data", tmp_path / "missing.jsonl"))
    assert "text" in one_line_error(run_cli("audit", "privacy", "--artifacts", folder, "--data", data, "--text-field", "nope"))
    assert "--noise-ratio and --clip" in one_line_error(
        run_cli("device", "--artifacts", folder, "--connect", "tcp://127.0.0.1:1", "--data", data, "--device-id", "d",
                "--noise-ratio", "0.5", "--clip", "1"))


def test_simulated_devices_add_the_same_noise(tiny_artifacts):
    from sftool.runtime.local_data import Example, TextEncoder
    from sftool.runtime.manifest import load_manifest
    from sftool.runtime.onnx_model import DeviceModel, choose_variant
    from sftool.training.sources import SimulatedDevice, SimulatedInbox

    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    model = DeviceModel(folder, manifest, choose_variant(manifest, "fp32"))
    encoder = TextEncoder(folder / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
    examples = [Example(i, r["text"], r["label"]) for i, r in enumerate(synthetic_rows(8, seed=7))]
    device = SimulatedDevice("d0", examples, 4).make_plan(encoder)
    inbox = SimulatedInbox([device], model, encoder, manifest.split, wire_dtype="fp32", defense=NoiseDefense(ratio=0.5, seed=0))
    batch = inbox.get(0.0).batch
    ids, mask = encoder.encode([examples[int(i)].text for i in batch.sample_ids])
    clean = model.forward(ids, mask)
    real = mask.astype(bool)
    ratios = np.linalg.norm((batch.hidden - clean)[real], axis=-1) / np.linalg.norm(clean[real], axis=-1)
    assert abs(ratios.mean() - 0.5) < 0.05, ratios
