"""After training: merge the LoRA adapter into the model, and export the merged model as ONNX.

The merged model is a plain transformers ``*ForSequenceClassification`` folder; its ONNX export
(through optimum) is the whole fine-tuned model for on-device inference, checked against PyTorch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sftool.errors import SftoolError

#: Largest acceptable ORT-vs-PyTorch logit difference of the merged export.
MERGED_PARITY_TOLERANCE = 1e-4


def _staged(out: Path):
    """A temporary folder beside ``out``; ``commit()`` moves it into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SftoolError(f"output folder {out} is not empty")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftoolError(f"cannot create {out.parent}: {exc.strerror}") from None
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _commit(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(staging, out)


def merge_run(run_dir: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """Merge a run's adapter (LoRA + head) into its base model; write a Hugging Face folder."""
    from peft import PeftModel
    from sftool.exporters.model_source import load_model, load_tokenizer
    from sftool.run_folder import read_run_record

    record = read_run_record(run_dir)
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise SftoolError(f"{run_dir} has no trained adapter")
    tokenizer = load_tokenizer(record["source"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"loading {record['source']} with {record['num_labels']} labels and the adapter of {run_dir}")
    base = load_model(record["source"], head="seq_cls", num_labels=record["num_labels"], pad_token_id=pad_id)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if record.get("label_names"):
        merged.config.id2label = dict(enumerate(record["label_names"]))
        merged.config.label2id = {name: i for i, name in enumerate(record["label_names"])}
    staging = _staged(out)
    try:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _commit(staging, Path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote the merged model to {out}")
    return Path(out)


def export_merged_onnx(source: Path, out: Path, opset: int = 18, log: Callable[[str], None] = print) -> dict:
    """ONNX of the whole fine-tuned model (a run folder is merged first), with a parity check.

    Returns the parity figures (max abs logit difference, prediction agreement).
    """
    import numpy as np
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForSequenceClassification

    source = Path(source)
    work = Path(tempfile.mkdtemp(prefix="sftool-merged-"))
    try:
        if (source / "run.json").is_file():
            merged_dir = merge_run(source, work / "merged", log)
        elif (source / "config.json").is_file():
            merged_dir = source
        else:
            raise SftoolError(f"{source} is neither a run folder nor a merged model folder")
        staging = _staged(out)
        try:
            log("exporting the merged model to ONNX through optimum")
            main_export(str(merged_dir), str(staging), task="text-classification", opset=opset)
            parity = _check_parity(merged_dir, staging, np, torch, transformers, ORTModelForSequenceClassification)
            if parity["max_abs_diff"] > MERGED_PARITY_TOLERANCE:
                raise SftoolError(f"merged ONNX differs from PyTorch by {parity['max_abs_diff']:.2e}; not writing it")
            (staging / "sftool_parity.json").write_text(json.dumps(parity, indent=2) + "\n")
            _commit(staging, Path(out))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out}: max abs logit diff {parity['max_abs_diff']:.2e}, predictions agree {parity['agreement']:.3f}")
    return parity


def _check_parity(merged_dir: Path, onnx_dir: Path, np, torch, transformers, ort_class) -> dict:
    from sftool.exporters.model_source import load_tokenizer

    tokenizer = load_tokenizer(str(merged_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = ["a short one", "a somewhat longer sentence to pad the first against", "good", "nothing here at all"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        ref = reference(**enc).logits.numpy()
    got = ort_class.from_pretrained(str(onnx_dir))(**enc).logits
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "texts": len(texts),
    }
