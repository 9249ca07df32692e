"""The run configuration: one TOML file per run, the one list of a run's settings and defaults.

``sftool serve --config FILE`` starts from it, command-line options override single entries, and
the run folder keeps the result as ``run.toml``; ``--resume`` reads it back. The defaults are the
dataclass defaults of ``ServeOptions`` (and its ``LoraSettings`` / ``OptimSettings``), nowhere else.

    [model]      source, artifacts
    [task]       task, num_labels, label_names, prompt_fields, answer_field, prompt_template
    [lora]       rank, alpha, dropout, targets
    [optim]      lr, weight_decay, warmup_steps, max_grad_norm
    [train]      batch_size, mix_capacity, mixing, schedule, max_steps, max_samples, seed, threads,
                 accelerator, precision, recompute, checkpoint_every, log_samples, cache_activations,
                 cache_max_gb
    [transport]  bind, devices, window, queue_size, device_timeout_s, pace, curve_secret, allow_keys, insecure,
                 activation_bound, max_devices, max_strikes
    [eval]       eval_data, eval_text_fields, eval_label_field, eval_every, eval_precision
    [run]        out
"""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import tomllib
from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text

RUN_CONFIG = "run.toml"

SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("source", "artifacts"),
    "task": ("task", "num_labels", "label_names", "prompt_fields", "answer_field", "prompt_template"),
    "lora": ("lora",),
    "optim": ("optim",),
    "train": ("batch_size", "mix_capacity", "mixing", "schedule", "max_steps", "max_samples", "seed", "threads",
              "accelerator", "precision", "recompute", "checkpoint_every", "log_samples", "cache_activations", "cache_max_gb"),
    "transport": ("bind", "devices", "window", "queue_size", "device_timeout_s", "pace", "curve_secret", "allow_keys",
                  "insecure", "activation_bound", "max_devices", "max_strikes"),
    "eval": ("eval_data", "eval_text_fields", "eval_label_field", "eval_every", "eval_precision"),
    "run": ("out",),
}
#: Sections that are one nested settings object of the options, not a group of its fields.
NESTED = {"lora": "lora", "optim": "optim"}
PATHS = ("artifacts", "eval_data", "out", "curve_secret", "allow_keys")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON's string escapes (\n, \t, \", \\, \uXXXX) are all valid in a TOML basic string; a
        # prompt template's newline written raw would make the file unreadable.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars and lists; None entries are left out (TOML has no null: absent = default)."""
    out = []
    for name, entries in sections.items():
        body = [f"{k} = {_toml_value(v)}" for k, v in entries.items() if v is not None]
        if body:
            out += [f"[{name}]", *body, ""]
    return "\n".join(out)


def options_to_sections(opts) -> dict[str, dict[str, Any]]:
    """``ServeOptions`` as the sections of a run configuration."""
    sections: dict[str, dict[str, Any]] = {}
    for section, names in SECTIONS.items():
        if section in NESTED:
            nested = getattr(opts, NESTED[section])
            sections[section] = {f.name: getattr(nested, f.name) for f in fields(nested)}
        else:
            sections[section] = {n: getattr(opts, n) for n in names}
    sections["model"]["artifacts"] = [str(p) for p in opts.artifacts]
    return sections


def write_run_config(run_dir: Path, opts) -> Path:
    path = Path(run_dir) / RUN_CONFIG
    atomic_write_text(path, "# The settings of this run; `sftool serve --config` starts a run from it.\n" + to_toml(options_to_sections(opts)))
    return path


def apply_sections(opts, sections: dict[str, Any], where: str = "the configuration"):
    """``opts`` with every entry of ``sections`` applied; unknown sections or keys are one-line errors."""
    changes: dict[str, Any] = {}
    for section, entries in sections.items():
        if section not in SECTIONS or not isinstance(entries, dict):
            raise SftoolError(f"{where}: unknown section [{section}] (have: {', '.join(SECTIONS)})")
        if section in NESTED:
            nested = getattr(opts, NESTED[section])
            known = {f.name for f in fields(nested)}
            bad = sorted(set(entries) - known)
            if bad:
                raise SftoolError(f"{where}: [{section}] has no entry {', '.join(bad)} (have: {', '.join(sorted(known))})")
            changes[NESTED[section]] = replace(nested, **entries)
            continue
        bad = sorted(set(entries) - set(SECTIONS[section]))
        if bad:
            raise SftoolError(f"{where}: [{section}] has no entry {', '.join(bad)} (have: {', '.join(SECTIONS[section])})")
        for key, value in entries.items():
            if key in PATHS and value is not None:
                value = [Path(v) for v in value] if key == "artifacts" else Path(value)
            changes[key] = value
    return replace(opts, **changes)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SftoolError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SftoolError(f"{path} is not valid TOML: {exc}") from None


def load_run_config(path: Path, base):
    """``base`` (the defaults, a dataclass) with the file's entries applied."""
    assert is_dataclass(base)
    return apply_sections(base, read_config(path), str(path))
