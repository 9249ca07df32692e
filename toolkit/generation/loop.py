"""The one generation loop: prompt, then choose, check the stop rule, step; for every decoding path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from sftool.generation.decoders import NextTokenModel
from sftool.generation.sampling import Sampler, StopRule


@dataclass
class Generation:
    """What one prompt produced, and how long each part took."""

    tokens: list[int]
    text: str
    #: "eos", "answer" (a completed ``#### N`` line) or "length" (``max_new_tokens`` reached).
    stop: str
    prompt_tokens: int
    prefill_s: float
    #: Wall seconds of the single-token steps (the tokens after the first), and per half where timed.
    steps_s: float
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Single-token model calls: every token after the first came from one."""
        return max(0, len(self.tokens) - 1)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "stop": self.stop, "prompt_tokens": self.prompt_tokens,
                "prefill_s": self.prefill_s, "steps_s": self.steps_s, "steps": self.steps,
                "step_seconds": dict(self.step_seconds)}


def generate(
    model: NextTokenModel,
    prompt_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    sampler: Sampler,
    stop: StopRule,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt_ids``; ``decode`` turns generated ids into text (for
    the stop rule and the result)."""
    started = time.perf_counter()
    logits = model.prefill(prompt_ids)
    prefill_done = time.perf_counter()
    tokens: list[int] = []
    reason = "length"
    while len(tokens) < max_new_tokens:
        tokens.append(sampler.choose(logits))
        found = stop.reason(tokens[-1], decode(tokens))
        if found:
            reason = found
            break
        if len(tokens) < max_new_tokens:
            logits = model.step(tokens[-1])
    return Generation(tokens, decode(tokens), reason, len(prompt_ids), prefill_done - started,
                      time.perf_counter() - prefill_done, dict(model.step_seconds))
