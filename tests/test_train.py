"""The training command: short runs, resume equality, signals, schedules,
bad input. Most runs use tests/tiny_training.py's tiny network (the loop is
the one AlexNet uses) so that each takes seconds; a few use AlexNet itself."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny_training
from op_testing import HAS_CUDA, requires_cuda
from alexnet_ext import checkpoint as ckpt
from alexnet_ext import train

ROOT = Path(__file__).resolve().parents[1]
FLOWERS12 = ROOT.parent / "shared" / "data" / "flowers12"
TINY = ["--image-size", "63", "--synthetic-classes", "4", "--synthetic-train", "48", "--synthetic-val", "16",
        "--batch-size", "8", "--workers", "0", "--no-progress", "--seed", "3"]


def has_alexnet_ops():
    import alexnet_ext.nn as ann
    return hasattr(ann, "Conv2dReLU") and hasattr(ann, "MaxPool2d")


requires_alexnet = pytest.mark.skipif(not has_alexnet_ops(), reason="the conv and pool operators are not built")


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny network's operations are far too small to share out among
    # threads; with several busy processes on a small machine, OpenMP's
    # barriers would make each step hundreds of times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_tiny(out, *extra):
    args = train.parse_args(TINY + ["--out", str(out)] + [str(e) for e in extra])
    return train.run(args, model_fn=tiny_training.tiny_model)


def read_metrics(out):
    with open(Path(out) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same_training_state(a, b):
    """Parameters and optimizer buffers bit-identical between two checkpoints."""
    sa, sb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), f"parameter {k} differs"
    for i, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][i]["momentum_buffer"])
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"])
    timing = ("images_per_s", "epoch_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(sa["metrics"]) == strip(sb["metrics"])
    assert sa["steps"] == sb["steps"]


def test_loss_falls_on_synthetic(tmp_path):
    assert run_tiny(tmp_path, "--epochs", 6, "--lr", 0.02, "--synthetic-train", 96) == 0
    m = read_metrics(tmp_path)
    assert len(m) == 6
    assert m[-1]["train_loss"] < m[0]["train_loss"] - 0.1
    assert m[-1]["val_loss"] < m[0]["val_loss"]


def test_outputs_checkpoints_and_plot(tmp_path):
    assert run_tiny(tmp_path, "--epochs", 2, "--plot", "--log-every", 2) == 0
    for name in ("metrics.csv", "steps.csv", "curves.png", "config.json", "last.pt", "last.prev.pt", "best.pt"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    m = read_metrics(tmp_path)
    assert [r["epoch"] for r in m] == [1, 2]
    for r in m:
        assert 0 <= r["val_top1_err"] <= 1 and r["val_top5_err"] <= r["val_top1_err"] and r["images_per_s"] > 0
    best = ckpt.load_checkpoint(tmp_path / "best.pt")
    assert best["metrics"][-1]["val_top1_err"] == min(r["val_top1_err"] for r in m)
    last = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (2, 0, 12)
    assert len(last["steps"]) == 6  # every 2nd of 12 steps
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 4 and len(config["classes"]) == 4


@pytest.mark.parametrize("stop_at", [4, 6, 9])  # mid-epoch 1, exactly at its end, mid-epoch 2
def test_resume_is_bit_identical(tmp_path, stop_at):
    assert run_tiny(tmp_path / "whole", "--epochs", 2) == 0
    assert run_tiny(tmp_path / "parts", "--epochs", 2, "--max-steps", stop_at) == 0
    state = ckpt.load_checkpoint(tmp_path / "parts" / "last.pt")
    assert state["global_step"] == stop_at and state["epoch"] == (0 if stop_at <= 6 else 1)
    assert run_tiny(tmp_path / "parts", "--epochs", 2, "--max-steps", stop_at, "--resume", "auto") == 0
    assert ckpt.load_checkpoint(tmp_path / "parts" / "last.pt")["global_step"] == stop_at  # nothing more to do
    assert run_tiny(tmp_path / "parts", "--epochs", 2, "--resume", "auto") == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", tmp_path / "parts" / "last.pt")


def test_resume_checkpoint_every_steps(tmp_path):
    # A mid-epoch checkpoint from --checkpoint-every, resumed by path.
    assert run_tiny(tmp_path / "whole", "--epochs", 1) == 0
    assert run_tiny(tmp_path / "a", "--epochs", 1, "--checkpoint-every", 2, "--max-steps", 5) == 0
    prev = ckpt.load_checkpoint(tmp_path / "a" / "last.prev.pt")
    assert prev["global_step"] == 4  # the periodic checkpoint before the stop
    assert run_tiny(tmp_path / "a", "--epochs", 1, "--resume", tmp_path / "a" / "last.prev.pt") == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", tmp_path / "a" / "last.pt")


def signal_mid_run(cmd, tmp_path, sig, delay_s):
    """Starts `cmd` (a tiny_training run sleeping 0.2 s per step), sends
    `sig` `delay_s` after its first training step began, and returns
    (returncode, stdout, stderr)."""
    marker = tmp_path / "started"
    env = dict(os.environ, TINY_SLEEP_S="0.2", TINY_MARKER=str(marker), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the training run never started"
            time.sleep(0.05)
        time.sleep(delay_s)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_step_checkpoints_and_resumes_exactly(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "tiny_training.py"), *TINY, "--epochs", "2", "--out", str(out)]
    # 0.3 s is well inside the first epoch (12 steps of >= 0.2 s).
    returncode, stdout, stderr = signal_mid_run(cmd, tmp_path, sig, 0.3)
    assert returncode == 128 + sig, (stdout, stderr)
    assert f"stopped ({signal.Signals(sig).name})" in stdout
    assert "Traceback" not in stderr
    state = ckpt.load_checkpoint(out / "last.pt")
    assert 1 <= state["global_step"] < 12
    # Resumed to the end, the run equals one that was never interrupted.
    assert run_tiny(out, "--epochs", 2, "--resume", out / "last.pt") == 0
    assert run_tiny(tmp_path / "whole", "--epochs", 2) == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", out / "last.pt")


def test_truncated_checkpoint_clear_error(tmp_path, capsys):
    assert run_tiny(tmp_path, "--epochs", 2) == 0
    last = tmp_path / "last.pt"
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 100)
    status = train.main(TINY + ["--resume", str(last), "--epochs", "3"])
    err = capsys.readouterr().err
    assert status == 2
    assert "truncated or corrupt" in err and str(last) in err and "last.prev.pt" in err
    # The previous checkpoint is intact and resumes.
    assert run_tiny(tmp_path, "--epochs", 3, "--resume", tmp_path / "last.prev.pt") == 0
    assert len(read_metrics(tmp_path)) == 3


def test_resume_rejects_a_different_network(tmp_path):
    assert run_tiny(tmp_path, "--epochs", 1) == 0
    with pytest.raises(ValueError, match="no_lrn"):
        run_tiny(tmp_path, "--epochs", 2, "--resume", "auto", "--no-lrn")


def test_learning_rate_divided_on_plateau_at_most_lr_drops_times(tmp_path):
    # With a vanishing learning rate the validation error cannot improve, so
    # every epoch after the first is a plateau (patience 0).
    lr = 1e-12
    assert run_tiny(tmp_path, "--epochs", 5, "--lr", lr, "--lr-patience", 0, "--lr-drops", 2,
                    "--limit-train-batches", 1, "--dropout", 0) == 0
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    expected = [lr, lr, lr / 10, lr / 100, lr / 100]
    assert lrs == pytest.approx(expected, rel=1e-4)


def test_corrupt_images_skipped_during_training(tmp_path, caplog):
    from PIL import Image
    import numpy as np
    data = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for j in range(n):
                px = np.random.default_rng(j).integers(0, 255, (90, 90, 3), dtype=np.uint8)
                Image.fromarray(px).save(data / split / c / f"{j}.jpg")
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with caplog.at_level("WARNING", logger="alexnet_ext.data"):
        status = run_tiny(tmp_path / "out", "--data", data, "--epochs", 1, "--batch-size", 3)
    assert status == 0
    assert "broken.jpg" in caplog.text
    assert len(read_metrics(tmp_path / "out")) == 1


def test_ten_crop_evaluation(tmp_path):
    assert run_tiny(tmp_path, "--epochs", 1, "--ten-crop", "--limit-train-batches", 1) == 0
    (row,) = read_metrics(tmp_path)
    assert 0 < row["val_loss"] < 10 and 0 <= row["val_top1_err"] <= 1


@pytest.mark.parametrize("opts", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"], ["--workers", "1"]])
def test_precision_layout_and_workers(tmp_path, opts):
    assert run_tiny(tmp_path, "--epochs", 1, "--limit-train-batches", 2, *opts) == 0
    (row,) = read_metrics(tmp_path)
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])


def test_worker_processes_give_the_same_batches(tmp_path):
    # Augmentation is keyed by (seed, epoch, index), not by which process
    # loads a sample, so workers change nothing.
    assert run_tiny(tmp_path / "w0", "--epochs", 1, "--workers", 0) == 0
    assert run_tiny(tmp_path / "w2", "--epochs", 1, "--workers", 2) == 0
    assert_same_training_state(tmp_path / "w0" / "last.pt", tmp_path / "w2" / "last.pt")


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--data", "--resume", "--ten-crop", "--amp", "--devices", "--no-lrn", "--pool-kernel",
                   "--activation", "--checkpoint-every", "--max-steps", "flowers12"):
        assert option in text
    for bad in (["--epochs", "0"], ["--lr", "-1"], ["--image-size", "32"], ["--columns", "3"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
    assert train.main(["--data", "/nonexistent/imagenet"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--columns 1"):
        train.resolve_devices(train.parse_args(["--devices", "cpu,cpu", "--columns", "1"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train.resolve_devices(train.parse_args(["--devices", "cuda:0"]))


def test_defaults_follow_the_data():
    synthetic = train.parse_args([])
    assert (synthetic.batch_size, synthetic.init) == (train.SYNTHETIC_DEFAULTS["batch_size"], "default")
    real = train.parse_args(["--data", "x"])
    assert (real.batch_size, real.init, real.epochs, real.lr, real.momentum, real.weight_decay) == \
        (128, "paper", 90, 0.01, 0.9, 5e-4)
    assert train.parse_args(["--data", "x", "--batch-size", "7", "--init", "default"]).batch_size == 7


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "tiny_training.py"), *TINY, "--epochs", "2", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[:2000], res.stderr[-2000:])
    assert res.stdout.count("epoch 2/2:") == 1  # rank 0 alone reports
    m = read_metrics(out)
    assert len(m) == 2
    state = ckpt.load_checkpoint(out / "last.pt")
    assert state["global_step"] == 6  # 48 images over 2 ranks at batch 8: 3 steps per epoch


def test_torchrun_sigterm_stops_every_rank_with_a_checkpoint(tmp_path):
    # torchrun forwards SIGTERM to both ranks; they agree on the step to stop
    # at (otherwise DDP would hang) and rank 0 writes the checkpoint.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "tiny_training.py"), *TINY, "--epochs", "3", "--out", str(out)]
    _, stdout, stderr = signal_mid_run(cmd, tmp_path, signal.SIGTERM, 0.5)
    assert "stopped (SIGTERM)" in stdout + stderr, (stdout, stderr[-3000:])
    state = ckpt.load_checkpoint(out / "last.pt")
    assert 1 <= state["global_step"] < 9  # 3 epochs of 3 steps per rank


def test_torchrun_ranks_stop_together_at_a_vote(tmp_path):
    # With --stop-check-every 2 the ranks learn of the signal only at even
    # steps (and epoch ends: step 7 of 7 per epoch here), and stop together.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "tiny_training.py"), *TINY, "--synthetic-train", "112", "--epochs", "2",
           "--stop-check-every", "2", "--out", str(out)]
    _, stdout, stderr = signal_mid_run(cmd, tmp_path, signal.SIGTERM, 0.3)
    assert "stopped (SIGTERM)" in stdout + stderr, (stdout, stderr[-3000:])
    state = ckpt.load_checkpoint(out / "last.pt")
    assert 1 <= state["global_step"] < 14
    assert state["global_step"] % 2 == 0 or state["global_step"] == 7, state["global_step"]


# --------------------------------------------------------------------------
# AlexNet itself
# --------------------------------------------------------------------------

@requires_alexnet
def test_alexnet_loss_falls_on_synthetic(tmp_path):
    # The real network and the default recipe of the synthetic set, at a
    # small input size (63x63) so that 48 steps take seconds, and half the
    # default learning rate: at batch 8 (1/16 of the paper's 128) lr 0.01 is
    # at the edge of stability (on seeds 0-4 the loss blows up by epoch 5 or
    # 6, and whether 4 epochs gained 0.2 hung on the kernels' last-bit
    # rounding); at 0.005, 4 epochs bring the train loss from 1.40-1.42 to
    # 0.65-0.95 on seeds 0-3.
    status = train.main(["--image-size", "63", "--synthetic-classes", "4", "--synthetic-train", "96",
                         "--synthetic-val", "32", "--batch-size", "8", "--epochs", "4", "--workers", "0",
                         "--lr", "0.005", "--no-progress", "--out", str(tmp_path), "--plot"])
    assert status == 0
    m = read_metrics(tmp_path)
    assert len(m) == 4
    assert m[-1]["train_loss"] < m[0]["train_loss"] - 0.2
    # Validation on 32 images at batch 8 swings by +-0.3 from one
    # epoch to the next, and where it lands at the last epoch depends on the
    # CPU's rounding (AVX2 vs AVX-512 kernels): ask that the network got well
    # below its first epoch, and below chance (ln 4 = 1.386), at some epoch.
    best_val = min(row["val_loss"] for row in m[1:])
    assert best_val < m[0]["val_loss"] - 0.2 and best_val < math.log(4) - 0.2
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "best.pt").is_file()


@requires_alexnet
def test_alexnet_column_parallel_resume_is_bit_identical(tmp_path):
    # Both columns placed by ColumnParallel (on the CPU twice here), dropout
    # active: stopping after 2 of 4 steps and resuming gives the same network.
    common = ["--image-size", "63", "--synthetic-classes", "3", "--synthetic-train", "16", "--synthetic-val", "4",
              "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress", "--devices", "cpu,cpu"]
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "parts"), "--max-steps", "2"]) == 0
    assert train.main(common + ["--out", str(tmp_path / "parts"), "--resume", "auto"]) == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", tmp_path / "parts" / "last.pt")


@requires_alexnet
@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"{FLOWERS12} not present")
def test_alexnet_flowers12_few_steps(tmp_path):
    status = train.main(["--data", str(FLOWERS12), "--batch-size", "4", "--limit-train-batches", "2",
                         "--limit-val-batches", "1", "--epochs", "1", "--workers", "1", "--no-progress",
                         "--out", str(tmp_path)])
    assert status == 0
    (row,) = read_metrics(tmp_path)
    # The paper's recipe at batch 4 overshoots in its first steps (loss in the
    # tens); two steps only show that the pipeline and the model run.
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) and 0 <= row["val_top1_err"] <= 1
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["classes"][:2] and len(state["classes"]) == 12


# --------------------------------------------------------------------------
# On GPUs (skipped here; run by `make test-cuda` / tools/gpu_report.sh)
# --------------------------------------------------------------------------

requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("opts", [["--devices", "cuda:0", "--amp", "bf16", "--channels-last"],
                                  ["--devices", "cuda:0", "--amp", "fp16"],
                                  ["--devices", "cuda:0", "--compile", "--amp", "bf16"],
                                  pytest.param(["--devices", "cuda:0,cuda:1"], marks=requires_two_gpus)])
def test_alexnet_gpu_runs(tmp_path, opts):
    status = train.main(["--synthetic-train", "64", "--synthetic-val", "32", "--batch-size", "16", "--epochs", "2",
                         "--workers", "2", "--no-progress", "--out", str(tmp_path), *opts])
    assert status == 0
    m = read_metrics(tmp_path)
    assert len(m) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in m)


# --------------------------------------------------------------------------
# The step never waits for the device (issue 13)
# --------------------------------------------------------------------------

class HostReads:
    """Counts the operations that read a tensor's value on the host
    (``aten._local_scalar_dense``: .item(), float(), bool(), int()) plus
    Tensor.tolist/.numpy/.cpu calls, tagged with where the loop was. On a GPU
    each is a device synchronisation; on the CPU they are what would be one."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        self.where = None
        self.calls = []
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and outer.where is not None:
                    outer.calls.append(outer.where)
                return func(*args, **(kwargs or {}))

        self.mode = Mode
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                if outer.where is not None:
                    outer.calls.append(outer.where)
                return _original(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)

        def tagged(fn, tag):
            def wrapper(s, state, *a, **k):
                before = self.where
                self.where = tag(state)
                try:
                    return fn(s, state, *a, **k)
                finally:
                    self.where = before
            return wrapper

        epoch = train.train_epoch

        def train_epoch(s, state, stopper):
            with self.mode():
                return tagged(epoch, lambda st: ("epoch", None))(s, state, stopper)
        monkeypatch.setattr(train, "train_epoch", train_epoch)
        monkeypatch.setattr(train, "train_step", tagged(train.train_step, lambda st: ("step", st.global_step + 1)))
        monkeypatch.setattr(train, "after_step", tagged(train.after_step, lambda st: ("after", st.global_step)))


def test_normal_steps_read_nothing_on_the_host(tmp_path, monkeypatch):
    """By structure, on the CPU: the SGD step itself never reads a device
    value on the host; its bookkeeping reads only the loss of a finished log
    window (at log steps: 4 and 8; epoch ends: 6 and 12). Steps 1-3, 5, 7 and
    9-11 read nothing."""
    reads = HostReads(monkeypatch)
    assert run_tiny(tmp_path, "--epochs", 2, "--log-every", 4, "--checkpoint-every", 0) == 0
    assert not [c for c in reads.calls if c[0] == "step"], reads.calls
    after = {c[1] for c in reads.calls if c[0] == "after"}
    assert after == {4, 6, 8, 12}, reads.calls
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert [r["step"] for r in state["steps"]] == [4, 6, 8, 12]


def test_counting_host_reads_sees_an_item(monkeypatch):
    reads = HostReads(monkeypatch)
    reads.where = ("step", 1)
    with reads.mode():
        torch.ones(2).sum().item()
        float(torch.ones(()))
    torch.ones(2).tolist()
    assert reads.calls == [("step", 1)] * 3


def test_loss_window_reads_closed_windows_in_order():
    w = train.LossWindow("cpu")
    w.add(torch.tensor(2.0), 4)
    w.add(torch.tensor(1.0), 4)
    w.close(dict(step=2))
    w.add(torch.tensor(3.0), 2)
    w.close(dict(step=3))
    assert w.ready() == [(12.0, 8, dict(step=2)), (6.0, 2, dict(step=3))]
    assert w.ready(wait=True) == []
    w.add(torch.tensor(0.5), 2)
    assert w.open_window() == (1.0, 2) and w.n == 2  # reading it leaves it open
    reopened = train.LossWindow("cpu", *w.open_window())
    reopened.add(torch.tensor(1.5), 2)
    reopened.close(dict(step=4))
    assert reopened.ready() == [(4.0, 4, dict(step=4))]


def test_stop_vote_schedule():
    """One process: every step, no collective. Under torchrun: every N steps
    and at the end of each epoch, on a CPU tensor (never a device read)."""
    single = train.StopVote(10)
    assert all(single.due(step, False) for step in range(1, 25)) and single.agreed(True) is True

    class FakeDist:
        class ReduceOp:
            MAX = "max"
        calls = []

        def get_backend(self):
            return "gloo"

        def all_reduce(self, t, op, group):
            assert t.device.type == "cpu" and op == "max" and group is None
            self.calls.append(t.clone())
            t.fill_(1.0)  # another rank got a signal

    vote = train.StopVote(3, FakeDist())
    assert [s for s in range(1, 10) if vote.due(s, s == 4)] == [3, 4, 6, 9]
    assert vote.agreed(False) is True and len(FakeDist.calls) == 1


def test_cuda_graphs_clear_errors(tmp_path, capsys):
    for bad in (["--cuda-graphs", "--compile"], ["--cuda-graphs", "--amp", "fp16"], ["--stop-check-every", "0"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs and --compile" in err and "fp16" in err
    status = train.main(TINY + ["--cuda-graphs", "--devices", "cpu", "--out", str(tmp_path)])
    assert status == 2
    assert "--cuda-graphs: it needs a CUDA device" in capsys.readouterr().err


def test_train_state_is_what_the_checkpoint_holds(tmp_path):
    """Every TrainState field is in last.pt and nothing else is (besides the
    format version); the keys are the ones format 1 always had, so older
    checkpoints resume."""
    import dataclasses
    assert run_tiny(tmp_path, "--epochs", 1, "--limit-train-batches", 2) == 0
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    names = {f.name for f in dataclasses.fields(train.TrainState)}
    assert set(state) == names | {"format_version"}
    assert set(state) == {"format_version", "model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch",
                          "global_step", "epoch_progress", "metrics", "steps", "best_top1_err", "rng", "config",
                          "classes"}
    assert state["format_version"] == ckpt.FORMAT_VERSION == 1



def test_checkpoint_from_before_train_state_resumes_exactly(tmp_path):
    """tests/data/checkpoint_format1_tiny_step9.pt was written by the training
    loop before TrainState (format 1, the tiny run of run_tiny stopped by
    --max-steps 9). Resumed now, the run ends with the parameters of a run
    that was never interrupted."""
    import shutil
    old = tmp_path / "old" / "last.pt"
    old.parent.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "checkpoint_format1_tiny_step9.pt", old)
    assert ckpt.load_checkpoint(old)["global_step"] == 9
    assert run_tiny(tmp_path / "old", "--epochs", 2, "--resume", old) == 0
    assert run_tiny(tmp_path / "whole", "--epochs", 2) == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", old)

# --------------------------------------------------------------------------
# On a GPU: no synchronisation inside a step, CUDA graphs (skipped here)
# --------------------------------------------------------------------------

def no_sync_inside(monkeypatch, *names):
    """Runs train.<name> with torch.cuda.set_sync_debug_mode("error"): any
    synchronising CUDA call inside raises."""
    for name in names:
        fn = getattr(train, name)

        def strict(*a, _fn=fn, **k):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        monkeypatch.setattr(train, name, strict)


@pytest.mark.cuda
@requires_cuda
@requires_alexnet
@pytest.mark.parametrize("opts", [["--amp", "bf16", "--channels-last"], ["--amp", "bf16", "--cuda-graphs"],
                                  ["--cuda-graphs"]])
def test_gpu_step_never_synchronises(tmp_path, monkeypatch, opts):
    """Every training step and its bookkeeping (log windows included) run
    without a host synchronisation; the loss still falls and is finite."""
    no_sync_inside(monkeypatch, "train_step", "after_step")
    if "--cuda-graphs" in opts:
        # The replay path is GraphedTrainStep.__call__ (capture, once, may sync).
        call = train.GraphedTrainStep.__call__

        def strict_replay(self, s, state, batch):
            if self.graph is None or self.lr != state.lr:
                return call(self, s, state, batch)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return call(self, s, state, batch)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        monkeypatch.setattr(train.GraphedTrainStep, "__call__", strict_replay)
    status = train.main(["--devices", "cuda:0", "--synthetic-train", "256", "--synthetic-val", "32",
                         "--batch-size", "32", "--epochs", "2", "--log-every", "2", "--checkpoint-every", "0",
                         "--workers", "2", "--no-progress", "--out", str(tmp_path), *opts])
    assert status == 0
    m = read_metrics(tmp_path)
    assert len(m) == 2 and all(math.isfinite(r["train_loss"]) for r in m)
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["global_step"] == 16 and [r["step"] for r in state["steps"]] == list(range(2, 17, 2))


@pytest.mark.cuda
@requires_cuda
def test_gpu_cuda_graphs_match_eager_steps(tmp_path):
    """The tiny network without dropout: replaying the captured step gives
    the parameters eager steps give (same kernels; float32 tolerance)."""
    def without_dropout(args, num_classes):
        net = tiny_training.TinyNet(num_classes)
        net.drop.p = 0.0
        return net

    common = TINY + ["--devices", "cuda:0", "--epochs", "1", "--synthetic-train", "64"]
    for name, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        args = train.parse_args(common + ["--out", str(tmp_path / name)] + extra)
        assert train.run(args, model_fn=without_dropout) == 0
    a, b = (ckpt.load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("eager", "graphs"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resume_from", ["last.prev.pt", "last.pt"])
def test_checkpoint_inside_a_log_window_keeps_its_losses(tmp_path, resume_from):
    # --log-every 4 with a periodic checkpoint at step 2 (--checkpoint-every 2)
    # and a stop at step 3: both checkpoints fall inside an open log window.
    # Resuming from either must give the uninterrupted run's train_loss and
    # steps.csv rows (the window reopens; its losses are not lost or logged early).
    flags = ("--epochs", 1, "--log-every", 4, "--checkpoint-every", 2)
    assert run_tiny(tmp_path / "whole", *flags) == 0
    assert run_tiny(tmp_path / "a", *flags, "--max-steps", 3) == 0
    state = ckpt.load_checkpoint(tmp_path / "a" / resume_from)
    assert state["global_step"] == (2 if resume_from == "last.prev.pt" else 3)
    assert state["epoch_progress"]["window_images"] == 8 * state["global_step"]
    assert run_tiny(tmp_path / "a", *flags, "--resume", tmp_path / "a" / resume_from) == 0
    assert_same_training_state(tmp_path / "whole" / "last.pt", tmp_path / "a" / "last.pt")
