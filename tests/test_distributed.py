"""Two server ranks (gloo, two real processes) train the adapter one process trains on the global
batch, the union of the ranks' local batches: classification (a mean over samples) and causal LM
(a mean over labelled tokens, which differ per rank). A rank that runs dry first keeps joining
the steps of the other, and both end together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sftool.runtime.protocol import IGNORE_INDEX
from sftool.server.checkpoint import TrainingProgress
from sftool.server.mixing import Sample, collate
from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
from sftool.server.trainer import OptimSettings, Trainer
from sftool.training.distributed import RankGroup
from sftool.training.ledger import Ledger
from sftool.training.loop import Budget, TrainingLoop
from sftool.training.methods.splitfrozen import SplitFrozen
from sftool.training.run_logger import RunLogger
from sftool.training.sources import END
from sftool.training.task import CausalLMTask, ClassificationTask

#: Batches per rank: rank 1 runs dry one step before rank 0.
BATCHES = {0: 3, 1: 2}
TASKS = ("classification", "causal-lm")


def make_model(path: str, task_name: str) -> SplitServerModel:
    torch.manual_seed(0)  # every rank starts from the same LoRA and head
    model = SplitServerModel(SplitModelSpec(path, ClassificationTask(), [2], 0, LoraSettings(rank=4, dropout=0.0)))
    if task_name == "causal-lm":
        task = CausalLMTask(model.config.vocab_size)
        torch.manual_seed(0)
        model = SplitServerModel(SplitModelSpec(path, task, [2], 0, LoraSettings(rank=4, dropout=0.0)))
    for p in model.trainable_parameters():  # nonzero B: every factor gets a gradient at step 1
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model


def make_batch(model: SplitServerModel, task_name: str, rank: int, index: int):
    """The index-th local batch of ``rank``: real device activations, rows of different lengths."""
    g = torch.Generator().manual_seed(100 * rank + index)
    n = 3 + rank  # ranks hold different batch sizes
    ids = torch.randint(3, 60, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[0, 5:] = 0
    ids[mask == 0] = 0
    from sftool.exporters.partition import DevicePart

    with torch.no_grad():
        hidden = DevicePart(model.adapter, model.adapter.backbone(model.peft_model), 2).eval()(ids, mask)
    samples = []
    for i in range(n):
        if task_name == "causal-lm":
            label = ids[i].clone()
            label[: 2 + (i + rank) % 3] = IGNORE_INDEX  # prompts of different lengths: counts differ
            label[mask[i] == 0] = IGNORE_INDEX
        else:
            label = (i + index + rank) % 2
        samples.append(Sample(hidden[i], mask[i], label, f"r{rank}", 10 * index + i, 0, index))
    return collate(samples)


class ListSource:
    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self, timeout: float = 0.05):
        return self.batches.pop(0) if self.batches else END

    def alive(self) -> bool:
        return True


def trainable_state(model: SplitServerModel) -> dict[str, list]:
    return {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters() if p.requires_grad}


def train(model: SplitServerModel, batches, ranks: RankGroup, out: Path) -> tuple[str, int]:
    trainer = Trainer(model, OptimSettings(lr=1e-2, warmup_steps=1), ranks=ranks)
    loop = TrainingLoop(SplitFrozen(model, trainer), ListSource(batches), Ledger(), RunLogger(out, enabled=False),
                        TrainingProgress(), Budget(), ranks=ranks)
    return loop.run(), loop.progress.step


def rank_main(rank: int, world: int, init_file: str, model_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ranks = RankGroup(rank, world)
    torch.set_num_threads(1)
    results = {}
    for task_name in TASKS:
        model = make_model(model_path, task_name)
        batches = [make_batch(model, task_name, rank, i) for i in range(BATCHES[rank])]
        reason, steps = train(model, batches, ranks, Path(out))
        results[task_name] = {"reason": reason, "steps": steps, "state": trainable_state(model)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    ranks.close()


@pytest.mark.timeout(300)
def test_two_ranks_train_the_global_batch(tiny_model, tmp_path):
    path = str(tiny_model("llama"))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, 2, str(tmp_path / "init"), path, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for task_name in TASKS:
        # One process, the global batches: both ranks' batch i together while both have one.
        model = make_model(path, task_name)
        local = {r: [make_batch(model, task_name, r, i) for i in range(n)] for r, n in BATCHES.items()}
        merged = [collate(local[0][i].samples + (local[1][i].samples if i < BATCHES[1] else []))
                  for i in range(BATCHES[0])]
        reason, steps = train(model, merged, RankGroup(), tmp_path)
        want = trainable_state(model)
        for r in (0, 1):
            assert got[r][task_name]["reason"] == "all devices finished"
            assert got[r][task_name]["steps"] == steps == BATCHES[0]
            assert got[r][task_name]["state"].keys() == want.keys()
            for name, values in want.items():
                torch.testing.assert_close(torch.tensor(got[r][task_name]["state"][name]), torch.tensor(values),
                                           rtol=1e-5, atol=1e-6, msg=f"{task_name} rank {r} {name}")
        assert got[0][task_name]["state"] == got[1][task_name]["state"]  # identical, not just close
