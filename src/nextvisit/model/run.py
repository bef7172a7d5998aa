"""The model run folder: what ``nextvisit pretrain`` and ``nextvisit baseline masked pretrain|finetune``
write and every scorer reads (docs/interfaces.md §4).

    RUN/
      config.yaml         the resolved config (``RunConfig`` for a next-visit run; the masked baseline's own,
                          with ``kind: masked-transformer``, for a masked run)
      vocab.json          \\
      tokenizer.yaml       > the store's tokenizer, copied (``TOKENIZER_FILES``): histories are tokenized
      lab_stats.parquet   /  with the vocabulary and lab bins the model was trained on
      model.safetensors   the latest good weights
      checkpoint/         weights, optimizer, RNG and data position for ``--resume`` (next-visit runs)
      metrics.csv         one row per logged step

``NextVisitRun`` is a next-visit run folder loaded for scoring (model, vocabulary, config, tokenizer), what
``forecast``, ``sample`` and the Python API (``nextvisit.api``) hold. Here too: the device and precision rules
every stage shares (``resolve_device``, ``autocast_for``).
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextvisit.artifacts.folders import atomic_write
from nextvisit.config import RunConfig
from nextvisit.errors import UserError
from nextvisit.model.transformer import NextVisitModel
from nextvisit.tokenize.store import Vocabulary

CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
TOKENIZER_FILES = (VOCAB_FILE, "tokenizer.yaml", "lab_stats.parquet")
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.csv"
CHECKPOINT = "checkpoint"
PRECISIONS = ("auto", "fp32", "bf16")


def copy_tokenizer_files(source: Path, run_dir: Path) -> None:
    """Copy the tokenizer files of a store (or another run) into a run folder."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copyfile(Path(source) / name, Path(run_dir) / name)


def read_tokenizer(run_dir: Path, for_histories: bool = True, vocab: Vocabulary | None = None):
    """The run's own tokenizer (vocab.json, tokenizer.yaml, lab statistics); ``vocab`` when the caller has
    read it already (``load_next_visit_run``), so the vocabulary is read once. With ``for_histories`` its
    guard against future dates is off: histories are already cut at each label's prediction time, so it has
    nothing left to guard, and it would refuse date-shifted cohorts (MIMIC's records lie in the 22nd
    century)."""
    import polars as pl

    from nextvisit.tokenize.config import TokenizerConfig
    from nextvisit.tokenize.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    missing = [name for name in TOKENIZER_FILES if not (run_dir / name).exists()]
    if missing:
        raise UserError(f"{run_dir}: {', '.join(missing)} missing; expected a model run folder (`nextvisit pretrain`)")
    config = TokenizerConfig.load(run_dir / "tokenizer.yaml")
    if for_histories:
        config = replace(config, max_time=None)
    vocab = vocab if vocab is not None else Vocabulary.load(run_dir / VOCAB_FILE)
    return Tokenizer(config, vocab, pl.read_parquet(run_dir / "lab_stats.parquet"))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as safetensors, written atomically."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(weights, str(tmp)))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``; a clear error when the file is unreadable or was written by
    another model shape."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable or corrupt checkpoint ({exc}); delete it or train again") from None
    expected = model.state_dict()
    fix = "give the run folder these weights were trained in, or train again"
    if set(state) != set(expected):
        lacking, foreign = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        detail = "; ".join(part for part in (
            f"{len(lacking)} tensor(s) of this model missing, e.g. {lacking[0]!r}" if lacking else "",
            f"{len(foreign)} tensor(s) it does not have, e.g. {foreign[0]!r}" if foreign else "") if part)
        raise UserError(f"{path}: weights do not match this model's config ({detail}); {fix}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config expects "
                            f"{tuple(expected[name].shape)} (a checkpoint from another vocabulary or size); {fix}")
    model.load_state_dict(state)


def load_next_visit_run(run_dir: Path, device="cpu") -> tuple[NextVisitModel, Vocabulary, RunConfig]:
    """(model in eval mode on ``device``, vocabulary, resolved config) of a next-visit run folder; config,
    vocabulary and weights are checked to agree."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir / name}: missing; give a run folder written by `nextvisit pretrain`")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    vocab = Vocabulary.load(run_dir / VOCAB_FILE)
    if config.model.vocab_size != len(vocab):
        raise UserError(f"{run_dir}: config.yaml has vocab_size {config.model.vocab_size} but vocab.json has "
                        f"{len(vocab)} tokens; the run folder is inconsistent")
    model = NextVisitModel(config.model)
    load_weights(model, run_dir / WEIGHTS_FILE)
    return model.to(device).eval(), vocab, config


@dataclass
class NextVisitRun:
    """A next-visit run folder loaded for scoring: the model (eval mode, on its device), its vocabulary, resolved
    config and tokenizer (``read_tokenizer``: for histories). What every scorer of a run reads, loaded once."""

    path: Path
    model: NextVisitModel
    vocab: Vocabulary
    config: RunConfig
    tokenizer: object  # nextvisit.tokenize.tokenizer.Tokenizer

    @classmethod
    def load(cls, run_dir: Path, device: str | None = None) -> "NextVisitRun":
        """``run_dir`` on ``device`` (``resolve_device``: CUDA when available for None)."""
        model, vocab, config = load_next_visit_run(run_dir, resolve_device(device))
        return cls(Path(run_dir), model, vocab, config, read_tokenizer(run_dir, vocab=vocab))

    @classmethod
    def of(cls, run, device: str | None = None) -> "NextVisitRun":
        """``run`` itself when it is loaded already, else the folder it names loaded on ``device``."""
        return run if isinstance(run, cls) else cls.load(run, device)


# -- device and precision ------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device (CUDA when available for None); a clear error for CUDA on a machine without it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(precision: str, device: torch.device):
    """(context factory, precision used): bfloat16 autocast for ``bf16``, and for ``auto`` where the device
    supports it; float32 otherwise."""
    check_precision(precision)
    if precision == "bf16" and not bf16_supported(device):
        raise UserError(f"precision is bf16 but this {device.type} does not support bfloat16; use fp32 or auto")
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16), "bf16"
    return nullcontext, "fp32"
