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
    assert path.read_bytes().startswith(checkpoint.MAGIC)
    assert not checkpoint.stale_temporaries(path)


def test_payload_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(sample_state(), path)
    payload = path.read_bytes()[48:]
    torch.load(io.BytesIO(payload), weights_only=True)


def test_truncated_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(sample_state(), path)
    data = path.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 60, 20, 3):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
            checkpoint.load(path)


def test_tampered_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(sample_state(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*sha256"):
        checkpoint.load(path)


def test_appended_bytes(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"x": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, plain)  # a torch file without our header
    with pytest.raises(CheckpointError, match="not a fastmeta checkpoint"):
        checkpoint.load(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_objects_are_refused_even_with_a_valid_digest(tmp_path):
    # A forger can recompute the sha256; weights_only is what stops the pickle from running.
    buffer = io.BytesIO()
    torch.save({"evil": Payload()}, buffer, pickle_module=pickle)
    payload = buffer.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(struct.pack("<8sQ32s", checkpoint.MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload)
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
