"""Atomic checkpoints and exact resume.

A checkpoint is written into a hidden temporary directory, then a `COMPLETE` marker is
written and fsynced last, and only then is the directory renamed to `step_<N>`. A crash at
any point leaves either the previous checkpoints untouched or a temporary directory that
`latest_checkpoint` never picks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import CheckpointError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(checkpoint_dir: str | Path, step: int, write: Callable[[Path], None],
                    keep: int | None = None) -> Path:
    """Write checkpoint `step` with `write(tmp_dir)`, atomically; keep the newest `keep`."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step}))
    with marker.open("rb") as f:
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. an interrupt right after a save)
        old = root / f".step_{step}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Directories without the marker are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / MARKER).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(checkpoint_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng(path: Path, state: dict[str, Any] | None = None) -> None:
    """The generators' state (this process's, or `state`) as `path` + `path`.python.json."""
    state = dict(state if state is not None else rng_state())
    version, internal, gauss = state.pop("python")
    path.with_suffix(".python.json").write_text(json.dumps([version, list(internal), gauss]))
    torch.save(state, path)


def load_rng(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = json.loads(path.with_suffix(".python.json").read_text())
    random.setstate((version, tuple(internal), gauss))


def load_torch(path: Path) -> Any:
    """Optimiser/scheduler state, loaded without unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is damaged")
    return torch.load(path, weights_only=True, map_location="cpu")
