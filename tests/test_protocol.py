"""Wire protocol v1: round trips, and every malformed input rejected before an array is built."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from sftool.runtime.protocol import (
    BatchSchema,
    ErrorCode,
    MsgType,
    ProtocolError,
    batch_arrays,
    decode_batch,
    decode_header,
    encode,
)

SCHEMA = BatchSchema(hidden_size=8, max_seq_len=16, max_batch=4, num_labels=2)


def good_batch(dtype=np.float16, b=3, t=5):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((b, t, 8)).astype(dtype)
    mask = np.ones((b, t), dtype=np.uint8)
    mask[0, 3:] = 0
    return batch_arrays(hidden, mask, np.array([0, 1, 1][:b]), np.arange(10, 10 + b))


def frames_of(arrays, **fields):
    return encode(MsgType.BATCH, "dev", arrays, seq=fields.pop("seq", 7), epoch=0, **fields)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_batch_round_trip_is_exact(dtype):
    arrays = good_batch(dtype)
    frames = [bytes(f) for f in frames_of(arrays)]
    header = decode_header(frames[0])
    batch = decode_batch(header, frames[1:], SCHEMA)
    assert batch.seq == 7 and batch.device == "dev"
    assert batch.hidden.dtype == dtype
    np.testing.assert_array_equal(batch.hidden, arrays[0][1])
    np.testing.assert_array_equal(batch.attention_mask, arrays[1][1])
    np.testing.assert_array_equal(batch.labels, [0, 1, 1])
    np.testing.assert_array_equal(batch.sample_ids, [10, 11, 12])


def expect_error(frames, code):
    with pytest.raises(ProtocolError) as info:
        header = decode_header(frames[0])
        decode_batch(header, frames[1:], SCHEMA)
    assert info.value.code == code, info.value.reason
    return info.value


def test_wrong_hidden_size_is_rejected():
    hidden = np.zeros((2, 5, 9), np.float16)
    frames = frames_of(batch_arrays(hidden, np.ones((2, 5), np.uint8), np.zeros(2), np.arange(2)))
    assert "hidden size" in expect_error([bytes(f) for f in frames], ErrorCode.BAD_ARRAY).reason


def test_wrong_dtype_is_rejected():
    arrays = good_batch()
    arrays[0] = ("hidden", arrays[0][1].astype(np.int64))
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_ARRAY)


def test_truncated_frame_is_rejected():
    frames = [bytes(f) for f in frames_of(good_batch())]
    frames[1] = frames[1][:-2]
    assert "bytes" in expect_error(frames, ErrorCode.BAD_ARRAY).reason


def test_missing_frame_is_rejected():
    frames = [bytes(f) for f in frames_of(good_batch())]
    expect_error(frames[:-1], ErrorCode.BAD_ARRAY)


def test_shape_mismatch_between_arrays_is_rejected():
    arrays = good_batch()
    arrays[2] = ("labels", np.zeros(2, np.int64))
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_ARRAY)


def test_limits_from_the_manifest_are_enforced():
    expect_error([bytes(f) for f in frames_of(good_batch(t=17))], ErrorCode.BAD_ARRAY)  # too long
    hidden = np.zeros((5, 4, 8), np.float16)
    arrays = batch_arrays(hidden, np.ones((5, 4), np.uint8), np.zeros(5), np.arange(5))
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_ARRAY)  # batch too big


def test_bad_values_are_rejected():
    arrays = good_batch()
    arrays[2] = ("labels", np.array([0, 2, 1]))
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_ARRAY)  # label out of range
    arrays = good_batch()
    arrays[1][1][1, 1] = 3
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_ARRAY)  # mask not 0/1
    arrays = good_batch(np.float32)
    arrays[0][1][0, 0, 0] = np.nan
    expect_error([bytes(f) for f in frames_of(arrays)], ErrorCode.BAD_VALUES)


def test_bad_headers_are_rejected():
    with pytest.raises(ProtocolError) as info:
        decode_header(b"\xc1not msgpack")
    assert info.value.code == ErrorCode.BAD_HEADER
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb({"v": 1, "type": "LAUNCH", "device": "d"}))
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb({"v": 99, "type": "BATCH", "device": "d"}))
    assert info.value.code == ErrorCode.VERSION_MISMATCH
    with pytest.raises(ProtocolError):
        decode_header(msgpack.packb([1, 2, 3]))
    with pytest.raises(ProtocolError):  # extension types (how pickle-like payloads would ride) refused
        decode_header(msgpack.packb({"v": 1, "type": "HELLO", "device": "d", "x": msgpack.ExtType(1, b"x")}))
    with pytest.raises(ProtocolError):
        decode_header(msgpack.packb({"v": 1, "type": "HELLO", "device": "d" * 65}))


def test_seq_must_be_a_non_negative_int():
    frames = [bytes(f) for f in encode(MsgType.BATCH, "dev", good_batch(), seq=-1)]
    expect_error(frames, ErrorCode.BAD_HEADER)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_activation_bound_check_agrees_with_isfinite_and_abs(dtype):
    from sftool.runtime.protocol import within_bound

    rng = np.random.default_rng(1)
    specials = [np.nan, -np.nan, np.inf, -np.inf, -0.0]
    for trial in range(3000):
        with np.errstate(over="ignore"):  # beyond float16's range is one of the cases
            values = (rng.standard_normal(40) * 10 ** rng.uniform(-2, 4.5)).astype(dtype)
        if trial % 5 == 0:
            values[rng.integers(40)] = specials[trial % len(specials)]
        bound = float(10 ** rng.uniform(-1, 5))
        if trial % 7 == 0 and np.isfinite(values[1]):
            bound = abs(float(values[1]))  # exactly at the bound
        with np.errstate(invalid="ignore"):
            expected = bool(np.isfinite(values).all() and (np.abs(values.astype(np.float64)) <= bound).all())
        assert within_bound(values, bound) == expected, (values, bound)
