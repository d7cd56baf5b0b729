import hashlib
import io
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from fastmeta import checkpoint
from fastmeta.checkpoint import CheckpointError


def sample_state():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": 17,
        "config": {"preset": "sinusoid", "lr": 0.01, "first_order": False, "steps": (1, 10), "data": None},
        "rng": checkpoint.rng_state(),
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    state = sample_state()
    path = tmp_path / "run" / "checkpoint.pt"  # the folder is created
    checkpoint.save(state, path)
    assert_same(state, checkpoint.load(path))
    assert not checkpoint.stale_temporaries(path)


def test_the_file_loads_with_plain_torch_load_weights_only(tmp_path):
    # What the README promises: a standard torch file, readable without fastmeta.
    state = sample_state()
    path = tmp_path / "c.pt"
    checkpoint.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"fastmeta_checkpoint", "sha256", "state"}
    assert loaded["fastmeta_checkpoint"] == checkpoint.FORMAT
    assert loaded["sha256"] == checkpoint.state_digest(state)
    assert_same(state, loaded["state"])


def test_state_digest_covers_content_not_layout():
    x = torch.arange(12.0).reshape(3, 4)
    digest = checkpoint.state_digest
    assert digest({"x": x}) == digest({"x": x.t().contiguous().t()})  # other strides, same values
    assert digest({"x": x}) == digest({"x": x.clone()})
    changed = x.clone()
    changed[1, 2] += 1e-6
    for other in ({"x": changed}, {"x": x.double()}, {"x": x.reshape(4, 3)}, {"y": x}, {"x": x, "n": 1}):
        assert digest(other) != digest({"x": x}), other
    assert digest({"a": [1, 2]}) != digest({"a": (1, 2)})
    assert digest({"a": 1}) != digest({"a": 1.0}) != digest({"a": True})
    assert digest({"a": 1, "b": 2}) != digest({"b": 2, "a": 1})  # order is part of a state_dict


def test_truncated_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(sample_state(), path)
    data = path.read_bytes()
    for keep in (len(data) - 1, len(data) - 20, len(data) // 2, 60, 20, 3):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
            checkpoint.load(path)


def test_a_flipped_bit_in_tensor_data_fails_the_digest(tmp_path):
    # torch.load does not check its archive's CRCs: without the digest this loads silently.
    path = tmp_path / "c.pt"
    state = sample_state()
    state["weights"] = torch.linspace(-3, 3, 257, dtype=torch.float64)
    checkpoint.save(state, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(state["weights"][100:110].numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*sha256"):
        checkpoint.load(path)


def test_a_state_changed_without_its_digest_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    state = {"iteration": 17, "weights": torch.ones(3)}
    stale = checkpoint.state_digest(state)
    for changed in ({"iteration": 18, "weights": torch.ones(3)}, {"iteration": 17, "weights": torch.ones(3) * 2}):
        torch.save({"fastmeta_checkpoint": checkpoint.FORMAT, "sha256": stale, "state": changed}, path)
        with pytest.raises(CheckpointError, match=f"{path}.*sha256"):
            checkpoint.load(path)


def test_appended_bytes(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"x": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(CheckpointError, match="5 unexpected bytes"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, plain)  # a torch file, but not one save wrote
    with pytest.raises(CheckpointError, match="not a fastmeta checkpoint"):
        checkpoint.load(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{text} is not a fastmeta checkpoint"):
        checkpoint.load(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)
    newer = tmp_path / "newer.pt"
    torch.save({"fastmeta_checkpoint": 3, "sha256": "", "state": {}}, newer)
    with pytest.raises(CheckpointError, match="has format 3"):
        checkpoint.load(newer)


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_objects_are_refused_even_with_a_valid_digest(tmp_path):
    # A forger can recompute the digest; weights_only is what stops the pickle from running.
    state = {"evil": Payload()}
    path = tmp_path / "evil.pt"
    torch.save({"fastmeta_checkpoint": checkpoint.FORMAT, "sha256": checkpoint.state_digest(state), "state": state},
               path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load(path)


def format_1_file(state) -> bytes:
    """A checkpoint as fastmeta wrote it before format 2: the FMCKPT header, then torch.save's bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return struct.pack("<8sQ32s", b"FMCKPT\x00\x01", len(payload), hashlib.sha256(payload).digest()) + payload


def test_format_1_checkpoints_are_still_read_and_checked(tmp_path):
    state = sample_state()
    path = tmp_path / "old.pt"
    data = format_1_file(state)
    path.write_bytes(data)
    assert_same(state, checkpoint.load(path))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{path}.*sha256"):
        checkpoint.load(path)
    for keep in (len(data) - 1, 40):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
            checkpoint.load(path)
    path.write_bytes(data + b"x")
    with pytest.raises(CheckpointError, match="1 unexpected bytes"):
        checkpoint.load(path)
    evil = io.BytesIO()
    torch.save({"evil": Payload()}, evil, pickle_module=pickle)
    payload = evil.getvalue()
    path.write_bytes(struct.pack("<8sQ32s", b"FMCKPT\x00\x01", len(payload), hashlib.sha256(payload).digest()) + payload)
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load(path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        checkpoint.save({"rng": {"numpy": np.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="key of type"):
        checkpoint.save({(1, 2): torch.ones(1)}, path)
    assert not path.exists()


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"generation": 1}, path)

    def chunks():
        yield b"partial data"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.atomic_write_bytes(path, chunks())
    assert checkpoint.load(path) == {"generation": 1}
    assert not checkpoint.stale_temporaries(path)


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator
    np.random.standard_normal()
    path = tmp_path / "rng.pt"
    checkpoint.save({"rng": checkpoint.rng_state()}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    actual = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), torch.rand(3))
    assert actual[:4] == expected[:4]
    assert torch.equal(actual[4], expected[4])
