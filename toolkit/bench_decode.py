"""``sftool bench decode``: per-token decoding time with the key/value cache vs recomputing the prefix, on
the device half (onnxruntime) and the server half (torch); split decode vs unsplit torch decode; and the
token-for-token agreement of split greedy vs unsplit greedy on GSM8K prompts.

Method. Every prompt (the GSM8K re-split's eval rows, the model's chat template) is decoded greedily for
exactly ``max_new_tokens`` tokens (no stop rule, so every row decodes as long) through the split (device
decoder + server blocks, both cached) and through the unsplit transformers model (its own cache); per-token
times are the single-token steps (the prefill apart), summed over prompts and divided by their steps.
Recomputing costs a full forward of the whole prefix per token, so it is timed at every
``recompute_every``-th position of the first ``recompute_prompts`` generations (the prefix is the prompt
and the tokens the cached run generated up to there): evenly spaced positions, whose mean is the mean
per-token cost over the generation. Those recomputed logits' argmax must be the cached run's next token.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from sftool.errors import SftoolError
from sftool.runtime.files import cpu_name


@dataclass
class DecodeBenchConfig:
    model: str = "smollm2-135m-instruct"
    split: int = 6
    #: An export with its decoder; exported here (``--with-decoder``, no int8) when missing.
    artifacts: Path | None = None
    run: Path | None = None
    prompts: int = 20
    max_new_tokens: int = 128
    recompute_prompts: int = 4
    recompute_every: int = 16
    threads: int | None = None

    def validate(self) -> None:
        if min(self.prompts, self.max_new_tokens, self.recompute_every) < 1 or self.recompute_prompts < 0:
            raise SftoolError("--prompts, --max-new-tokens and --recompute-every must be >= 1, --recompute-prompts >= 0")


def _ensure_export(cfg: DecodeBenchConfig, work: Path, log: Callable[[str], None]) -> Path:
    from sftool.exporters.onnx_export import ExportOptions, export_device
    from sftool.runtime.manifest import MANIFEST_NAME, load_manifest

    folder = cfg.artifacts or work / f"export-split-{cfg.split}"
    if (folder / MANIFEST_NAME).is_file() and load_manifest(folder, verify_files=False).decoder is not None:
        return folder
    log(f"exporting {cfg.model} at split {cfg.split} with its decoder into {folder}")
    export_device(ExportOptions(cfg.model, cfg.split, folder, with_decoder=True), log=lambda m: log(f"export: {m}"))
    return folder


def _per_token_ms(total_s: float, steps: int) -> float:
    return 1000.0 * total_s / steps if steps else float("nan")


def run_decode_bench(cfg: DecodeBenchConfig, work: Path, log: Callable[[str], None] = print) -> dict:
    """Measure; returns the figures (per-token milliseconds, ratios, agreement) and each prompt's row."""
    import numpy as np
    from sftool.generation.decoders import RecomputeSplitDecoder
    from sftool.generation.evaluate import read_prompts
    from sftool.generation.loop import generate
    from sftool.generation.sampling import Sampler, StopRule
    from sftool.generation.setup import build_setup
    from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant

    cfg.validate()
    artifacts = _ensure_export(cfg, work, log)
    setup = build_setup(artifacts, cfg.model, cfg.run, ["split", "unsplit"], cfg.threads, log=log)
    examples = read_prompts("gsm8k", setup.template, limit=cfg.prompts)
    manifest = setup.manifest
    recompute = RecomputeSplitDecoder(
        DeviceModel(artifacts, manifest, choose_variant(manifest, "fp32"), settings=SessionSettings(threads=cfg.threads)),
        setup.server,
    )
    no_stop = StopRule.of([], answer_line=False)
    rows = []
    for n, example in enumerate(examples, 1):
        ids = setup.prompt_ids(example.text)
        split = generate(setup.decoders["split"], ids, setup.decode, cfg.max_new_tokens, Sampler(), no_stop)
        unsplit = generate(setup.decoders["unsplit"], ids, setup.decode, cfg.max_new_tokens, Sampler(), no_stop)
        first_diff = next((i for i, (a, b) in enumerate(zip(split.tokens, unsplit.tokens)) if a != b), None)
        row = {"id": example.sample_id, "prompt_tokens": len(ids), "steps": split.steps,
               "split_steps_s": split.steps_s, "split_device_s": split.step_seconds["device"],
               "split_server_s": split.step_seconds["server"], "unsplit_steps_s": unsplit.steps_s,
               "split_prefill_s": split.prefill_s, "unsplit_prefill_s": unsplit.prefill_s,
               "tokens_equal": split.tokens == unsplit.tokens, "first_difference": first_diff}
        if n <= cfg.recompute_prompts:
            device_s, server_s, agree, points = [], [], 0, list(range(0, split.steps, cfg.recompute_every))
            for i in points:
                # The prefix before generated token i + 1: the prompt and tokens 0..i.
                logits = recompute.prefill([*ids, *split.tokens[: i + 1]])
                device_s.append(recompute.last_seconds[0])
                server_s.append(recompute.last_seconds[1])
                agree += int(np.argmax(logits)) == split.tokens[i + 1]
            row.update({"recompute_points": len(points), "recompute_device_ms": 1000 * statistics.fmean(device_s),
                        "recompute_server_ms": 1000 * statistics.fmean(server_s), "recompute_agrees": agree})
        rows.append(row)
        log(f"[{n}/{len(examples)}] id {example.sample_id}: {len(ids)} prompt tokens, split "
            f"{_per_token_ms(split.steps_s, split.steps):.1f} ms/token, unsplit "
            f"{_per_token_ms(unsplit.steps_s, unsplit.steps):.1f} ms/token, equal: {'yes' if row['tokens_equal'] else 'no'}")
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "artifacts": str(artifacts), "cpu": cpu_name(), "figures": summarize(rows), "rows": rows,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def summarize(rows: list[dict]) -> dict:
    """Per-token milliseconds and the ratios the targets name, from the per-prompt rows."""
    steps = sum(r["steps"] for r in rows)
    timed = [r for r in rows if "recompute_points" in r]
    timed_steps = sum(r["steps"] for r in timed)
    out = {
        "prompts": len(rows), "new_tokens_per_prompt": rows[0]["steps"] + 1 if rows else 0,
        "equal_token_for_token": sum(r["tokens_equal"] for r in rows),
        "split_ms_per_token": _per_token_ms(sum(r["split_steps_s"] for r in rows), steps),
        "split_device_ms_per_token": _per_token_ms(sum(r["split_device_s"] for r in rows), steps),
        "split_server_ms_per_token": _per_token_ms(sum(r["split_server_s"] for r in rows), steps),
        "unsplit_ms_per_token": _per_token_ms(sum(r["unsplit_steps_s"] for r in rows), steps),
    }
    out["split_vs_unsplit"] = out["split_ms_per_token"] / out["unsplit_ms_per_token"]
    if timed:
        points = sum(r["recompute_points"] for r in timed)
        cached_device = _per_token_ms(sum(r["split_device_s"] for r in timed), timed_steps)
        cached_server = _per_token_ms(sum(r["split_server_s"] for r in timed), timed_steps)
        recompute_device = sum(r["recompute_device_ms"] * r["recompute_points"] for r in timed) / points
        recompute_server = sum(r["recompute_server_ms"] * r["recompute_points"] for r in timed) / points
        out.update({
            "recompute_prompts": len(timed), "recompute_points": points,
            "recompute_argmax_agrees": sum(r["recompute_agrees"] for r in timed),
            "device_cached_ms": cached_device, "device_recompute_ms": recompute_device,
            "device_speedup": recompute_device / cached_device,
            "server_cached_ms": cached_server, "server_recompute_ms": recompute_server,
            "server_speedup": recompute_server / cached_server,
        })
    return out


def print_decode_bench(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f = results["figures"]
    console = Console()
    if "device_speedup" in f:
        table = Table(title=f"per-token decode time, ms (first {f['recompute_prompts']} prompts; {results['cpu']}, shared machine)")
        for col in ("half", "with KV cache", "recompute prefix", "speed-up"):
            table.add_column(col, justify="right")
        table.add_row("device (onnxruntime)", f"{f['device_cached_ms']:.2f}", f"{f['device_recompute_ms']:.2f}",
                      f"{f['device_speedup']:.1f}x")
        table.add_row("server (torch)", f"{f['server_cached_ms']:.2f}", f"{f['server_recompute_ms']:.2f}",
                      f"{f['server_speedup']:.1f}x")
        console.print(table)
    table = Table(title=f"split vs unsplit decode, {f['prompts']} GSM8K prompts x {f['new_tokens_per_prompt']} new tokens")
    for col in ("path", "ms per token", "of which device", "of which server"):
        table.add_column(col, justify="right")
    table.add_row("split (local, both cached)", f"{f['split_ms_per_token']:.2f}", f"{f['split_device_ms_per_token']:.2f}",
                  f"{f['split_server_ms_per_token']:.2f}")
    table.add_row("unsplit torch (cached)", f"{f['unsplit_ms_per_token']:.2f}", "", "")
    console.print(table)
    console.print(f"split / unsplit per token: {f['split_vs_unsplit']:.2f}x; greedy equal token for token on "
                  f"{f['equal_token_for_token']} of {f['prompts']} prompts"
                  + (f"; recomputed argmax = cached token at {f['recompute_argmax_agrees']} of {f['recompute_points']} "
                     "positions" if "recompute_points" in f else ""), highlight=False)
