"""The run folder at the start of ``nextvisit pretrain`` (the contract: ``nextvisit.model.run``): a new run gets
the store's tokenizer files and its resolved config, written together (``nextvisit.artifacts.folders``: a run killed
while they are written leaves no folder); a resumed run continues with the config in the folder."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from nextvisit.artifacts.folders import atomic_folder, holding, remove_partial_files
from nextvisit.config import RunConfig
from nextvisit.errors import UserError
from nextvisit.model.run import CONFIG_FILE, VOCAB_FILE, copy_tokenizer_files
from nextvisit.tokenize.store import TokenStore, Vocabulary
from nextvisit.model.distributed import Distributed


def prepare_run_dir(run_dir: Path, store: TokenStore, config: RunConfig, resume: bool) -> RunConfig:
    """The run's config: for a new run ``config`` with the store's vocabulary size, written with the tokenizer
    files into the (empty or absent) folder; for ``resume`` the folder's own, checked against the store."""
    vocab_path = run_dir / VOCAB_FILE
    if resume:
        if not (run_dir / CONFIG_FILE).exists():
            raise UserError(f"{run_dir}: no {CONFIG_FILE}; nothing to resume (start without --resume)")
        config = RunConfig.load(run_dir / CONFIG_FILE)
        if not vocab_path.exists() or Vocabulary.load(vocab_path).tokens != store.vocab.tokens:
            raise UserError(f"{run_dir}: the run's vocabulary differs from the store {store.path}'s; resume with the "
                            f"store it was trained on, or start a new run folder")
        removed = remove_partial_files(run_dir)
        if removed:
            print(f"nextvisit pretrain: removed {len(removed)} unfinished file(s) a killed run left in {run_dir}: "
                  f"{', '.join(p.name for p in removed)}", file=sys.stderr)
        return config
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir}: folder is not empty; use --resume to continue that run or choose a new --out")
    config.model.vocab_size = len(store.vocab)
    with atomic_folder(run_dir, overwrite=False) as staging:
        copy_tokenizer_files(store.path, staging)
        config.save(staging / CONFIG_FILE)
    return config


def shared_run_config(run_dir: Path, store: TokenStore, config: RunConfig, resume: bool, dist: Distributed,
                      held: ExitStack) -> RunConfig:
    """Process 0 takes the run folder's lock (``holding``, until ``held`` closes: the end of the run) and prepares
    the folder (``prepare_run_dir``); the others then read the config it wrote. A refusal on process 0 (the
    folder locked by another run, not empty, nothing to resume) stops every process with its message."""
    with dist.together():
        if dist.main:
            held.enter_context(holding(run_dir))
            config = prepare_run_dir(run_dir, store, config, resume)
    if not dist.main:
        config = RunConfig.load(run_dir / CONFIG_FILE)
    return config
