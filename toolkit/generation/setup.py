"""Everything a generation needs, from an export (with its decoder), a model and optionally a run folder.

The split path is sftool's own: the device decoder of the export and a ``SplitServerModel`` (the class the
server trains) with the run's adapter loaded into it. The unsplit path is independent of both: the plain
``AutoModelForCausalLM`` with the same adapter attached by ``peft.PeftModel.from_pretrained``. The prompt is
rendered with the model's chat template where it has one, and tokenized with the export's tokenizer (as a
device does), the same ids for both paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sftool.errors import SftoolError
from sftool.run_config import RUN_CONFIG
from sftool.runtime.local_data import PROMPT_SLOT, TextEncoder
from sftool.runtime.manifest import Manifest, load_manifest

PATHS = ("split", "unsplit")


def chat_prompt_template(tokenizer) -> str | None:
    """The model's chat format around one user turn, with ``{prompt}`` where the turn's text goes and the
    assistant's turn opened; None where the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT_SLOT}], add_generation_prompt=True,
                                             tokenize=False)
    return rendered if rendered.count(PROMPT_SLOT) == 1 else None


def render_prompt(template: str | None, text: str) -> str:
    """``text`` in ``template``'s slot (as ``read_prompt_answer`` renders a data row), or as it is."""
    return template.replace(PROMPT_SLOT, text) if template else text


@dataclass
class RunAdapter:
    """A run folder's tuned adapter: where it is and which blocks it tunes."""

    folder: Path
    config: dict
    layers: list[int] | None  # None: every block
    run_dir: Path = Path(".")

    @classmethod
    def read(cls, run_dir: Path) -> RunAdapter:
        from sftool.run_folder import ADAPTER, read_run_record
        from sftool.server.checkpoint import adapter_weights_file

        read_run_record(run_dir)  # a one-line error where it is not a run folder
        folder = Path(run_dir) / ADAPTER
        adapter_weights_file(folder)
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise SftoolError(f"{folder} has no readable adapter_config.json") from None
        if config.get("task_type") != "CAUSAL_LM":
            raise SftoolError(f"{run_dir} trained a {config.get('task_type') or 'non-causal-LM'} head; generation needs a "
                              "causal-LM run (sftool serve --task causal-lm)")
        layers = config.get("layers_to_transform")
        layers = [layers] if isinstance(layers, int) else (None if layers is None else [int(i) for i in layers])
        return cls(folder, config, layers, run_dir=Path(run_dir))

    def training_template(self) -> str | None:
        """The prompt template the run trained with (its run.toml's ``[task] prompt_template``), or None."""
        if not (self.run_dir / RUN_CONFIG).is_file():
            return None
        from sftool.server.serve import load_run_options

        return load_run_options(self.run_dir).prompt_template

    def lora_settings(self):
        from sftool.settings import LoraSettings

        targets = self.config.get("target_modules")
        return LoraSettings(rank=int(self.config["r"]), alpha=int(self.config["lora_alpha"]), dropout=0.0,
                            targets=sorted(targets) if targets else None)

    def check_split(self, split: int) -> None:
        """The frozen device part cannot run a block the adapter tunes."""
        if self.layers is None or min(self.layers) < split:
            tuned = "every block" if self.layers is None else f"block {min(self.layers)}"
            raise SftoolError(f"the run's adapter tunes {tuned}, on the device side of split {split}: the frozen device "
                              "export cannot run it (use the unsplit path, or a SplitFrozen run)")


@dataclass
class GenerationSetup:
    """The decoders, tokenization and stop tokens of one generation session."""

    artifacts: Path
    manifest: Manifest
    source: str
    encoder: TextEncoder
    template: str | None
    eos_token_ids: list[int]
    max_positions: int
    adapter: RunAdapter | None = None
    server: object | None = None  # SplitServerModel (split path)
    unsplit_model: object | None = None  # transformers / peft causal LM (unsplit path)
    decoders: dict[str, object] = field(default_factory=dict)
    _tokenizer: object | None = None

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of an already rendered prompt, as the device's tokenizer gives them."""
        ids = self.encoder.token_ids([text])[0]
        if not ids:
            raise SftoolError("the prompt is empty")
        return ids

    def decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)


def build_setup(
    artifacts: Path,
    model: str | None = None,
    run: Path | None = None,
    paths: Sequence[str] = PATHS,
    threads: int | None = None,
    chat_template: bool = True,
    log: Callable[[str], None] = print,
    prompt_template: str | None = None,
) -> GenerationSetup:
    """Load what ``paths`` need. Raises SftoolError on an export without a decoder, a run whose adapter
    does not fit, or a model whose device blocks differ from the export's.

    Prompts are rendered with ``prompt_template`` where given, else with the template the run trained
    with (none: bare prompts, as it trained), else with the model's chat template (``chat_template``)."""
    import torch
    from sftool.exporters.model_source import load_config, load_model, load_tokenizer
    from sftool.runtime.decoder_session import DecoderSession
    from sftool.runtime.onnx_model import SessionSettings
    from sftool.training.task import CausalLMTask
    from tokenizers import Tokenizer

    unknown = set(paths) - set(PATHS)
    if unknown or not paths:
        raise SftoolError(f"paths must be some of {', '.join(PATHS)}, not {', '.join(sorted(unknown)) or 'none'}")
    if threads is not None:
        if threads < 1:
            raise SftoolError("--threads must be >= 1")
        torch.set_num_threads(threads)
    artifacts = Path(artifacts)
    manifest = load_manifest(artifacts)
    if "split" in paths:
        manifest.require_decoder()
    source = model or manifest.source
    adapter = RunAdapter.read(run) if run is not None else None
    config = load_config(source)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    tokenizer_file = artifacts / manifest.tokenizer_file
    if prompt_template is not None and PROMPT_SLOT not in prompt_template:
        raise SftoolError(f"a prompt template needs the slot {PROMPT_SLOT}")
    if prompt_template is not None:
        template = prompt_template
    elif adapter is not None:
        template = adapter.training_template()
        log("prompts in the run's template" if template else "bare prompts, as the run trained")
    else:
        template = chat_prompt_template(load_tokenizer(str(artifacts))) if chat_template else None
    # The device's own tokenization: no truncation below the model's context.
    max_positions = int(getattr(config, "max_position_embeddings", 2048))
    setup = GenerationSetup(artifacts, manifest, source, TextEncoder(tokenizer_file, max_positions, manifest.pad_token_id),
                            template, [int(t) for t in eos if t is not None], max_positions, adapter,
                            _tokenizer=Tokenizer.from_file(str(tokenizer_file)))

    if "split" in paths:
        from sftool.generation.decoders import SplitDecoder
        from sftool.server.checkpoint import load_adapter_weights
        from sftool.server.split_model import SplitModelSpec, SplitServerModel

        log(f"loading the server part of {source} from block {manifest.split} (split path)")
        spec = SplitModelSpec(source, CausalLMTask(int(config.vocab_size)), [manifest.split],
                              pad_token_id=manifest.pad_token_id)
        if adapter is not None:
            adapter.check_split(manifest.split)
            spec.lora, spec.lora_layers = adapter.lora_settings(), adapter.layers
        server = SplitServerModel(spec)
        if server.fingerprints[manifest.split] != manifest.weights_fingerprint:
            raise SftoolError(f"the device blocks of {source} differ from the ones exported in {artifacts} (weights "
                              "fingerprint): give the --model the export was made from")
        if adapter is not None:
            load_adapter_weights(server, adapter.folder)
        setup.server = server.eval()
        device = DecoderSession.open(artifacts, manifest, SessionSettings(threads=threads))
        setup.decoders["split"] = SplitDecoder(device, setup.server)
    if "unsplit" in paths:
        from sftool.generation.decoders import UnsplitDecoder

        log(f"loading {source} unsplit" + (" with the run's adapter (peft)" if adapter else "") + " (unsplit path)")
        hf_model = load_model(source, head="causal_lm")
        if adapter is not None:
            from peft import PeftModel

            hf_model = PeftModel.from_pretrained(hf_model, str(adapter.folder))
        setup.unsplit_model = hf_model.eval()
        setup.decoders["unsplit"] = UnsplitDecoder(setup.unsplit_model)
    return setup
