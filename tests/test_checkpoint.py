"""Atomic checkpoints: what is on disk is always a complete checkpoint."""
import os
import random

import numpy as np
import pytest
import torch

from alexnet_ext import checkpoint as ckpt


def make_state(step, value=None):
    return {"format_version": ckpt.FORMAT_VERSION, "model": {"w": torch.full((4, 3), float(step) if value is None else value)},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "step_in_epoch": step,
            "global_step": step, "rng": ckpt.rng_state(), "metrics": [{"epoch": 1, "loss": 2.5}]}


def leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_save_load_round_trip_keeps_previous(tmp_path):
    path = tmp_path / ckpt.LAST
    ckpt.save_checkpoint(make_state(1), path)
    assert not os.path.exists(ckpt.previous_path(path))
    ckpt.save_checkpoint(make_state(2), path)
    assert ckpt.load_checkpoint(path)["global_step"] == 2
    assert ckpt.load_checkpoint(ckpt.previous_path(path))["global_step"] == 1
    assert ckpt.load_checkpoint(path)["metrics"] == [{"epoch": 1, "loss": 2.5}]
    assert leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # as open() would create it, not mkstemp's 0600


def test_link_checkpoint_survives_the_source_being_replaced(tmp_path):
    path, best = tmp_path / ckpt.LAST, tmp_path / ckpt.BEST
    ckpt.save_checkpoint(make_state(1), path)
    ckpt.link_checkpoint(path, best)
    ckpt.save_checkpoint(make_state(2), path)
    ckpt.save_checkpoint(make_state(3), path)
    assert ckpt.load_checkpoint(best)["global_step"] == 1
    assert ckpt.load_checkpoint(path)["global_step"] == 3


def test_truncated_checkpoint_clear_error_previous_intact(tmp_path):
    path = tmp_path / ckpt.LAST
    ckpt.save_checkpoint(make_state(1), path)
    ckpt.save_checkpoint(make_state(2), path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value) and ckpt.previous_path(path) in str(err.value)
    assert ckpt.load_checkpoint(ckpt.previous_path(path))["global_step"] == 1


@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_not_a_checkpoint_and_missing(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ckpt.CheckpointError, match="not an alexnet_ext training checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    newer = make_state(1)
    newer["format_version"] = ckpt.FORMAT_VERSION + 1
    torch.save(newer, path)
    with pytest.raises(ckpt.CheckpointError, match="newer"):
        ckpt.load_checkpoint(path)


def test_crash_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LAST
    ckpt.save_checkpoint(make_state(1), path)
    before = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(make_state(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["global_step"] == 1
    assert leftovers(tmp_path) == []


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state()
    expected = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(state)
    got = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_rng_state_survives_weights_only_loading(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(make_state(1), path)
    state = torch.load(path, weights_only=True)
    ckpt.set_rng_state(state["rng"])


def test_find_resume_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert ckpt.find_resume_checkpoint(str(out)) is None
    ckpt.save_checkpoint(make_state(1), out / ckpt.LAST)
    ckpt.save_checkpoint(make_state(2), out / ckpt.LAST)
    assert ckpt.find_resume_checkpoint(str(out)) == str(out / ckpt.LAST)
    (out / ckpt.LAST).write_bytes(b"broken")
    assert ckpt.find_resume_checkpoint(str(out)) == ckpt.previous_path(out / ckpt.LAST)
    # Without --out: the newest run under runs/.
    runs = tmp_path / "runs"
    ckpt.save_checkpoint(make_state(5), runs / "a" / ckpt.LAST)
    ckpt.save_checkpoint(make_state(6), runs / "b" / ckpt.LAST)
    os.utime(runs / "a" / ckpt.LAST, (1, 1))
    assert ckpt.find_resume_checkpoint(None, runs_dir=str(runs)) == str(runs / "b" / ckpt.LAST)
    assert ckpt.find_resume_checkpoint(None, runs_dir=str(tmp_path / "none")) is None


def test_dataclass_state_round_trip_includes_every_field(tmp_path):
    """state_payload/restore_state go field by field: a field nobody listed
    in checkpoint.py (here `extra`) is saved and restored; components go
    through state_dict/load_state_dict; RECORD_ONLY fields are written but
    keep the resuming run's value; an empty state dict (a disabled
    component) is skipped."""
    import dataclasses

    class Disabled:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            raise AssertionError("a disabled component is not loaded")

    @dataclasses.dataclass
    class State:
        model: torch.nn.Module
        off: Disabled
        note: str = dataclasses.field(default="", metadata=ckpt.RECORD_ONLY)
        step: int = 0
        extra: list = dataclasses.field(default_factory=list)
        rng: ckpt.GlobalRNG = dataclasses.field(default_factory=ckpt.GlobalRNG)

    torch.manual_seed(0)
    saved = State(torch.nn.Linear(3, 2), Disabled(), note="old run", step=7, extra=[1, {"a": 2.5}])
    path = ckpt.save_checkpoint(ckpt.state_payload(saved), tmp_path / "s.pt")
    expected_draw = torch.rand(3)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format_version", "model", "off", "note", "step", "extra", "rng"}
    torch.manual_seed(1)
    fresh = State(torch.nn.Linear(3, 2), Disabled(), note="new run")
    ckpt.restore_state(fresh, payload, path)
    assert (fresh.step, fresh.extra, fresh.note) == (7, [1, {"a": 2.5}], "new run")
    for k, v in saved.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # the RNG came back
    del payload["extra"]
    with pytest.raises(ckpt.CheckpointError, match="extra"):
        ckpt.restore_state(State(torch.nn.Linear(3, 2), Disabled()), payload, path)
    with pytest.raises(TypeError, match="dataclass"):
        ckpt.state_payload({"step": 1})
