"""Device partitioners: coverage, purity, reproducibility, balance."""

from __future__ import annotations

import numpy as np
import pytest
from sftool.errors import SftoolError
from sftool.partitioners import label_count_table, label_counts, parse_scheme, partition

# 300 samples, 3 labels with uneven sizes, interleaved so index order says nothing about labels.
LABELS = [i % 3 if i % 5 else 0 for i in range(300)]


def _flat(shards):
    return sorted(i for s in shards for i in s)


SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100", "labels:1", "labels:2", "labels:3", "labels:7"]
# labels:C needs n*C >= 3 devices x labels to cover the 3 labels (the shortfall is tested as an error).
CASES = [(s, n) for s in SCHEMES for n in (1, 3, 4, 10) if not (s.startswith("labels:") and n * int(s[7:]) < 3)]


@pytest.mark.parametrize("scheme,n", CASES)
def test_every_sample_exactly_once(scheme, n):
    shards = partition(LABELS, n, scheme, seed=0)
    assert len(shards) == n
    assert _flat(shards) == list(range(len(LABELS)))
    assert all(s == sorted(s) for s in shards)


def test_labels_1_purity_and_round_robin():
    labels = [0] * 40 + [1] * 20  # 3 devices, 2 labels: devices 0 and 2 share label 0
    shards = partition(labels, 3, "labels:1", seed=0)
    held = [{labels[i] for i in s} for s in shards]
    assert held == [{0}, {1}, {0}]
    assert sorted(len(s) for s in (shards[0], shards[2])) == [20, 20]
    assert len(shards[1]) == 20


def test_labels_c_holds_c_labels():
    shards = partition(LABELS, 4, "labels:2", seed=1)
    for s in shards:
        assert len({LABELS[i] for i in s}) == 2


def test_labels_too_few_devices_is_an_error():
    with pytest.raises(SftoolError, match="covers only 2 of 3 labels"):
        partition(LABELS, 2, "labels:1", seed=0)


def test_dirichlet_reproducible_and_seed_dependent():
    a = partition(LABELS, 5, "dirichlet:0.5", seed=7)
    b = partition(LABELS, 5, "dirichlet:0.5", seed=7)
    c = partition(LABELS, 5, "dirichlet:0.5", seed=8)
    assert a == b
    assert a != c


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    def max_share(alpha):
        counts = label_counts(partition(LABELS, 4, f"dirichlet:{alpha}", seed=0), LABELS, ["a", "b", "c"])
        return max(max(v[k] for k in "abc") / v["total"] for d, v in counts.items() if d != "total")

    assert max_share(0.05) > 0.9
    assert max_share(1000) < 0.6


def test_dirichlet_leaves_no_device_empty():
    for seed in range(20):
        shards = partition(LABELS, 10, "dirichlet:0.01", seed=seed)
        assert all(shards), seed


def test_iid_balanced():
    shards = partition(LABELS, 7, "iid", seed=3)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # Label mix per device close to the global mix.
    glob = np.bincount(LABELS) / len(LABELS)
    for s in shards:
        mix = np.bincount([LABELS[i] for i in s], minlength=3) / len(s)
        assert np.abs(mix - glob).max() < 0.2


def test_iid_reproducible():
    assert partition(LABELS, 3, "iid", 0) == partition(LABELS, 3, "iid", 0)
    assert partition(LABELS, 3, "iid", 0) != partition(LABELS, 3, "iid", 1)


@pytest.mark.parametrize("bad", ["", "iid:2", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "labels:0",
                                 "labels:1.5", "shards:2", "labels"])
def test_parse_errors(bad):
    with pytest.raises(SftoolError, match="bad partition scheme"):
        parse_scheme(bad)


def test_parse_ok():
    assert parse_scheme("IID") == ("iid", None)
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
    assert parse_scheme("labels:1") == ("labels", 1)


def test_zero_devices_is_an_error():
    with pytest.raises(SftoolError):
        partition(LABELS, 0, "iid", 0)


def test_counts_and_table():
    labels = [0, 0, 1, 1, 1]
    shards = [[0, 2], [1, 3, 4]]
    counts = label_counts(shards, labels, ["neg", "pos"])
    assert counts == {
        "device-0": {"neg": 1, "pos": 1, "total": 2},
        "device-1": {"neg": 1, "pos": 2, "total": 3},
        "total": {"neg": 2, "pos": 3, "total": 5},
    }
    table = label_count_table(shards, labels, ["neg", "pos"])
    lines = table.splitlines()
    assert lines[0].split() == ["device", "neg", "pos", "total"]
    assert lines[2].split() == ["device-0", "1", "1", "2"]
    assert lines[-1].split() == ["total", "2", "3", "5"]
