"""What depends on the task: the head, the labels' shape on the wire, the loss, the metrics.

Methods and the training loop call a :class:`Task` and never branch on which task it is:
:class:`ClassificationTask` (one class id per sample, a ``score`` head) and :class:`CausalLMTask`
(one token label per position, the model's own LM head, loss on the answer tokens only) plug into
the same model, trainer and loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from sftool.runtime.protocol import IGNORE_INDEX  # one value on the wire, on devices and in the loss

__all__ = ["IGNORE_INDEX", "CausalLMTask", "ClassificationTask", "LabelSpec", "Score", "Task", "answer_labels",
           "last_token_index"]



@dataclass(frozen=True)
class LabelSpec:
    """What a batch carries as labels: the manifest records it, the wire validates against it."""

    #: Label dims after the batch dim: () for one class id per sample, ("T",) for one per token.
    dims: tuple[str, ...]
    dtype: str = "int64"
    #: Number of distinct valid label values (class ids 0..n-1, or the vocabulary size).
    num_values: int = 2
    #: A label value that counts as "no label" (token labels of the prompt), or None.
    ignore_index: int | None = None

    def as_dict(self) -> dict:
        return {"dims": list(self.dims), "dtype": self.dtype, "num_values": self.num_values, "ignore_index": self.ignore_index}


@dataclass
class Score:
    """A running sum of a task's metrics over batches (loss summed over counted items)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, other: Score) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.count += other.count

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")


class Task(Protocol):
    """The task a run trains: everything the loop and the methods must not know themselves."""

    name: str
    #: ``sftool.exporters.model_source.load_model`` head: "seq_cls" or "causal_lm".
    head: str
    label_spec: LabelSpec

    def peft_task_type(self): ...

    def model_kwargs(self) -> dict: ...

    def head_module(self, hf_model: torch.nn.Module) -> torch.nn.Module: ...

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor, head: torch.nn.Module) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> Score: ...

    def labels_tensor(self, labels: Sequence) -> torch.Tensor: ...


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (what a causal LM's classification head pools)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


@dataclass(frozen=True)
class ClassificationTask:
    """One class per sample: the last real token's hidden state through a linear head (``score``),
    cross-entropy, accuracy. The head is what transformers' ``*ForSequenceClassification`` has, so
    the adapter (LoRA + head as ``modules_to_save``) loads with plain peft on the unsplit model."""

    num_labels: int = 2
    label_names: tuple[str, ...] | None = field(default=None)
    name: str = "classification"
    head: str = "seq_cls"

    def __post_init__(self) -> None:
        if self.num_labels < 2:
            raise ValueError("a classification task needs at least 2 labels")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_labels} labels")

    @property
    def label_spec(self) -> LabelSpec:
        return LabelSpec(dims=(), num_values=self.num_labels)

    def peft_task_type(self):
        from peft import TaskType

        return TaskType.SEQ_CLS

    def model_kwargs(self) -> dict:
        return {"head": self.head, "num_labels": self.num_labels}

    def head_module(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return hf_model.score

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        """[B, C] from the final-norm output [B, T, H]: the head on each row's last real token."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head(hidden[rows, last_token_index(attention_mask)])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> Score:
        loss_sum = float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct = int((logits.argmax(-1) == labels).sum())
        return Score(loss_sum, correct, int(labels.numel()))

    def labels_tensor(self, labels: Sequence) -> torch.Tensor:
        return torch.as_tensor([int(y) for y in labels], dtype=torch.long)


def answer_labels(input_ids: Sequence[int], prompt_tokens: int) -> list[int]:
    """Token labels of one sample: its ids, with the first ``prompt_tokens`` (the prompt) ignored,
    so the loss covers the answer alone."""
    ids = [int(t) for t in input_ids]
    keep = max(0, min(prompt_tokens, len(ids)))
    return [IGNORE_INDEX] * keep + ids[keep:]


@dataclass(frozen=True)
class CausalLMTask:
    """Next-token prediction on the answer tokens: the model's own LM head (frozen; tied to the input
    embeddings in SmolLM2 and Llama-3.2), logits at every position, cross-entropy of position t
    against token t+1 wherever that token is labelled. The adapter (LoRA only) loads with plain peft
    on ``AutoModelForCausalLM``."""

    vocab_size: int
    ignore_index: int = IGNORE_INDEX
    name: str = "causal-lm"
    head: str = "causal_lm"

    @property
    def label_spec(self) -> LabelSpec:
        return LabelSpec(dims=("T",), num_values=self.vocab_size, ignore_index=self.ignore_index)

    def peft_task_type(self):
        from peft import TaskType

        return TaskType.CAUSAL_LM

    def model_kwargs(self) -> dict:
        return {"head": self.head}

    def head_module(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return hf_model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        """[B, T, V] next-token logits from the final-norm output [B, T, H]."""
        return head(hidden)

    def _shifted(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Position t predicts token t+1: the last position has nothing to predict, the first token
        # is never a target.
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled (answer) tokens of the batch."""
        flat_logits, flat_labels = self._shifted(logits, labels)
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=self.ignore_index)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> Score:
        """Loss summed over labelled tokens, and how many of them the argmax predicts."""
        flat_logits, flat_labels = self._shifted(logits, labels)
        counted = flat_labels != self.ignore_index
        loss_sum = float(F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=self.ignore_index, reduction="sum"))
        correct = int((flat_logits.argmax(-1)[counted] == flat_labels[counted]).sum())
        return Score(loss_sum, correct, int(counted.sum()))

    def labels_tensor(self, labels: Sequence) -> torch.Tensor:
        """[B, T] from per-sample token labels, right-padded with the ignore index to the longest."""
        rows = [[int(t) for t in row] for row in labels]
        longest = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), longest), self.ignore_index, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out
