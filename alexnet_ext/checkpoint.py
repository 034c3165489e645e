"""Checkpoints that survive crashes, power loss and Ctrl-C.

- save_checkpoint() writes to a temporary file in the same folder, fsyncs it,
  keeps the checkpoint it replaces as ``<name>.prev.pt`` (a hard link, so no
  copy), renames the new file over the old one and fsyncs the folder. At
  every instant there is a complete checkpoint on disk: a crash mid-write
  leaves the old one untouched.
- load_checkpoint() turns a truncated or corrupt file into a CheckpointError
  that names the file and the previous good checkpoint to resume from.
- Everything stored is plain tensors, numbers, strings and containers of
  them, so files load with ``torch.load(weights_only=True)``.
- state_payload() / restore_state() turn a training-state dataclass into a
  checkpoint and back field by field, so the file's keys are the
  dataclass's fields: a field added to the state is saved and restored
  without anyone listing it here.
"""
import dataclasses
import os
import random
import tempfile

import numpy as np
import torch

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
REQUIRED_KEYS = ("format_version", "model", "optimizer", "epoch", "step_in_epoch", "global_step")


def _read_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (missing, truncated, corrupt, or
    not one of ours)."""


def previous_path(path):
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext or '.pt'}"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_with_link(src, dst):
    """Makes `dst` name the same file as `src`, atomically (hard link to a
    temporary name, then rename); copies where hard links are unsupported."""
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, write, keep_previous=False):
    """Calls write(binary_file) on a temporary file beside `path`, fsyncs it
    and renames it over `path` (then fsyncs the folder): readers see the old
    file or the new one, never a partial one. With keep_previous the file it
    replaces stays available as previous_path(path)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            _replace_with_link(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return path


def save_checkpoint(state, path, keep_previous=True):
    """Atomically writes `state` (a dict) to `path`, keeping the checkpoint
    it replaces as previous_path(path)."""
    return atomic_write(path, lambda f: torch.save(state, f), keep_previous=keep_previous)


def link_checkpoint(src, dst):
    """Publishes an existing checkpoint under a second name (e.g. best.pt),
    atomically and without copying its bytes where the file system allows."""
    _replace_with_link(os.fspath(src), os.fspath(dst))
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def load_checkpoint(path, map_location="cpu"):
    """Loads a checkpoint written by save_checkpoint, or raises CheckpointError
    saying what is wrong and which previous checkpoint is intact."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {_first_line(err)})."
            + _fallback_hint(path)) from err
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not an alexnet_ext training checkpoint (missing {missing})."
                              + _fallback_hint(path))
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer alexnet_ext (checkpoint format "
                              f"{state['format_version']}, this version reads up to {FORMAT_VERSION})")
    return state


def _first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "no details"


def _fallback_hint(path):
    prev = previous_path(path)
    if os.path.isfile(prev):
        return f" The previous checkpoint {prev} is intact: resume from it with --resume {prev}"
    return ""


def find_resume_checkpoint(out_dir=None, runs_dir="runs"):
    """--resume auto: <out_dir>/last.pt when out_dir is given, otherwise the
    newest runs/*/last.pt. Falls back to the .prev.pt beside a last.pt that
    does not load. Returns None when there is nothing to resume."""
    if out_dir is not None:
        candidates = [os.path.join(out_dir, LAST)]
    elif os.path.isdir(runs_dir):
        candidates = sorted((os.path.join(runs_dir, d, LAST) for d in os.listdir(runs_dir)),
                            key=lambda p: os.path.getmtime(p) if os.path.exists(p) else -1, reverse=True)
    else:
        candidates = []
    for path in candidates:
        for option in (path, previous_path(path)):
            if os.path.isfile(option):
                try:
                    load_checkpoint(option)
                except CheckpointError as err:
                    print(f"--resume auto: skipping {option}: {err}", flush=True)
                    continue
                return option
        if out_dir is None and os.path.exists(path):
            break  # the newest run had checkpoints but none loads: do not silently pick an older run
    return None


# ---------------------------------------------------------------------------
# A training-state dataclass <-> a checkpoint
# ---------------------------------------------------------------------------

# Field metadata: restore=False marks a field that is written for the reader
# (e.g. the run's configuration) but that the resuming run sets itself.
RECORD_ONLY = {"restore": False}


def state_payload(state) -> dict:
    """The checkpoint of dataclass `state`: one key per field, plus
    format_version. A field whose value has ``state_dict()`` (a module, an
    optimizer, a scheduler, a scaler, :class:`GlobalRNG`) is stored as its
    state dict; any other value is stored as it is."""
    if not dataclasses.is_dataclass(state):
        raise TypeError(f"state_payload: `state` must be a dataclass instance, got {type(state).__name__}")
    payload = {"format_version": FORMAT_VERSION}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        payload[f.name] = value.state_dict() if hasattr(value, "state_dict") else value
    return payload


def restore_state(state, payload: dict, path="checkpoint"):
    """Puts checkpoint `payload` back into dataclass `state`, field by field:
    ``load_state_dict`` for the fields that have it, assignment otherwise;
    fields marked RECORD_ONLY are left as they are. An empty state dict is a
    component that was disabled when saved (e.g. a GradScaler without fp16)
    and is skipped. A field the checkpoint lacks is a CheckpointError naming
    it (the file predates the field; its format version would say so)."""
    missing = [f.name for f in dataclasses.fields(state)
               if f.metadata.get("restore", True) and f.name not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing} (checkpoint format {payload.get('format_version')}); "
                              "it cannot be resumed by this version")
    for f in dataclasses.fields(state):
        if not f.metadata.get("restore", True):
            continue
        current, saved = getattr(state, f.name), payload[f.name]
        if hasattr(current, "load_state_dict"):
            if not (isinstance(saved, dict) and not saved):
                current.load_state_dict(saved)
        else:
            setattr(state, f.name, saved)
    return state


class GlobalRNG:
    """The process's global random generators (torch, CUDA, numpy, Python) as
    a component with state_dict()/load_state_dict(), so that a training state
    holds them like any other field."""

    def state_dict(self):
        return rng_state()

    def load_state_dict(self, state):
        set_rng_state(state)

    def __repr__(self):
        return "GlobalRNG()"


# ---------------------------------------------------------------------------
# RNG states, as plain tensors/ints so they survive weights_only loading
# ---------------------------------------------------------------------------

def rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
