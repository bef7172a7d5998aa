"""The run's checkpoint (``RUN/checkpoint/``: weights, optimizer, RNG, step and data position) for an exact
``--resume``, written atomically: a complete folder replaces the old one.

A process killed at any moment of ``save_checkpoint`` leaves one complete checkpoint that ``load_checkpoint``
finds: ``checkpoint/`` (the old or the new one), or, killed between its two renames, ``checkpoint.old/`` (the old
one). The half-written ``checkpoint.tmp/`` is never read, and the next save replaces it. The files are flushed to
disk (``fsync``) before the renames, so a power cut cannot leave a renamed folder of empty files either.

A run with ``train.ema_decay`` keeps two sets of weights: the trained ones (``checkpoint/model.safetensors``, which
the optimizer steps) and their moving average (``checkpoint/ema.safetensors``, its update count in ``state.json``),
and the run's own ``model.safetensors`` is the average."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextvisit.errors import UserError
from nextvisit.model.run import CHECKPOINT, WEIGHTS_FILE, load_weights, save_weights


EMA_FILE = "ema.safetensors"


def save_checkpoint(run_dir: Path, model, optimizer, state: dict, ema=None) -> None:
    """Write checkpoint/ atomically (a complete folder replaces the old one) and model.safetensors: the weights of
    ``model``, or of ``ema`` (a ``torch.optim.swa_utils.AveragedModel`` of it) when given."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        files = [tmp / WEIGHTS_FILE, tmp / "optimizer.pt", tmp / "state.json", tmp]
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()},
                      str(tmp / EMA_FILE))
            state = {**state, "ema_updates": int(ema.n_averaged)}
            files.insert(0, tmp / EMA_FILE)
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for path in files:
            _fsync(path)
    except Exception:  # e.g. a full disk: the half-written folder goes, so it holds no space; the old one stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)
    save_weights(model if ema is None else ema.module, run_dir / WEIGHTS_FILE)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_folder(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run: ``checkpoint/``, or ``checkpoint.old/`` when a save was killed between
    its two renames; None when the run has none."""
    for folder in (run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")):
        if (folder / "state.json").exists():
            return folder
    return None


def has_checkpoint(run_dir: Path) -> bool:
    return _checkpoint_folder(Path(run_dir)) is not None


def load_checkpoint(run_dir: Path, model, optimizer, ema=None) -> dict:
    """Restore weights, optimizer and RNG from the checkpoint (and the moving average into ``ema``, for a run with
    ``train.ema_decay``); returns its state (step, epoch, index, tokens, elapsed_s)."""
    folder = _checkpoint_folder(run_dir)
    if folder is None:
        raise UserError(f"{run_dir}: no checkpoint to resume from; start a new run in another folder")
    load_weights(model, folder / WEIGHTS_FILE)
    try:
        extra = torch.load(folder / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(extra["optimizer"])
        state = json.loads((folder / "state.json").read_text())
    except Exception as exc:  # any unreadable part means the checkpoint cannot be trusted
        raise UserError(f"{folder}: corrupt checkpoint ({type(exc).__name__}: {exc}); start a new run") from None
    ema_updates = state.pop("ema_updates", None)
    if ema is not None:
        if not (folder / EMA_FILE).exists() or ema_updates is None:
            raise UserError(f"{folder}: the run's config.yaml sets train.ema_decay but its checkpoint holds no "
                            f"moving average ({EMA_FILE}); resume it with the config.yaml it was trained with, "
                            f"or start a new run")
        load_weights(ema.module, folder / EMA_FILE)
        ema.n_averaged.fill_(ema_updates)
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


def checkpoint_step(run_dir: Path):
    """The step of the run's checkpoint, or "none yet"."""
    path = run_dir / CHECKPOINT / "state.json"
    return json.loads(path.read_text())["step"] if path.exists() else "none yet"
