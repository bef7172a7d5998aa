"""Every number of the masked baseline: the encoder (``MaskedModelConfig``), masked-token pretraining
(``PretrainConfig``), fine-tuning (``FinetuneConfig``), and the presets that bundle them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from nextvisit.config import merge
from nextvisit.errors import UserError

BETAS = (0.9, 0.98)  # AdamW betas of pretraining and fine-tuning (BERT's)
FINETUNE_MIN_LR_FRACTION = 0.1  # fine-tuning's cosine ends at lr * this


@dataclass
class MaskedModelConfig:
    vocab_size: int = 0  # filled from the store's vocabulary
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.1
    context: int = 256  # tokens per window, CLS and SEPs included (paper BERT: 512)
    max_visit_types: int = 128  # token types: CLS + visit indices, the last one shared by later visits
    rope_base: float = 10_000.0  # rotary base over day offsets
    init_std: float = 0.02

    def validate(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserError(f"masked model: d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.context < 8:
            raise UserError(f"masked model: context {self.context} is too small (at least 8 tokens)")


@dataclass
class PretrainConfig:
    batch_size: int = 32
    max_steps: int = 20_000
    max_minutes: float | None = None  # wall-clock budget of the training loop; the CLI flag overrides
    lr: float = 1e-3
    min_lr_fraction: float = 0.1  # cosine from lr to lr * this over the run (steps or minutes, whichever ends first)
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.15  # BERT
    mask_token_share: float = 0.8  # of masked positions: MASK token; then random token; the rest unchanged
    random_token_share: float = 0.1
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = torch's default); 1 is best for tiny models on a busy machine


@dataclass
class FinetuneConfig:
    batch_size: int = 32
    max_epochs: int = 20
    max_minutes: float | None = None  # wall-clock budget of the whole command (tokenize, train, predict)
    # optimizer steps of a run at most (each fold run; the refit runs on the fold run's schedule): with
    # max_minutes null, a run's length, and so its result, no longer depends on how fast the machine is
    max_steps: int | None = None
    min_steps: int = 10  # optimizer steps taken even when the budget is spent before training starts
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0  # steps between tuning evaluations; 0 = once per epoch
    # tuning histories scored at each evaluation, a fixed subset drawn within each class (every history with a
    # positive label, up to half of it; the rest at random; finetune.evaluation_subset); 0 = all
    eval_histories: int = 2000
    patience: int = 3  # evaluations without a better tuning AUROC before stopping
    # Share of training draws given to rows with a positive label (None = sample rows uniformly). Rare
    # outcomes then reach the encoder more often; the head's bias is shifted back afterwards by each
    # output's sampling odds, so probabilities stay calibrated (prior-shift correction: exact for one
    # output, a marginal approximation when horizons share rows).
    positive_share: float | None = None
    predict_batch_size: int = 128
    # When the tuning split holds fewer than 30 positive subjects of an output (nextvisit.baselines.selection)
    # the stopping step is chosen by cross-validation within train: folds of subjects (grouped, stratified by
    # outcome), each fold's best step on its validation subjects, their median, then a refit on all train
    # rows stopped there. ``cv_folds_run`` trains only the first folds (cheaper); ``cv_refit: false`` keeps
    # the one fold run's best weights instead of refitting (the cost of today's single run).
    cv_folds: int = 5
    cv_folds_run: int | None = None  # None = all cv_folds
    cv_refit: bool = True
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = torch's default)

    def validate(self, source: str) -> "FinetuneConfig":
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"{source}: finetune.max_steps must be null or at least 1, got {self.max_steps}")
        if self.cv_folds < 2:
            raise UserError(f"{source}: finetune.cv_folds must be at least 2, got {self.cv_folds}")
        if self.cv_folds_run is not None and not 1 <= self.cv_folds_run <= self.cv_folds:
            raise UserError(f"{source}: finetune.cv_folds_run must be null or between 1 and cv_folds "
                            f"({self.cv_folds}), got {self.cv_folds_run}")
        if not self.cv_refit and self.cv_folds_run != 1:
            raise UserError(f"{source}: finetune.cv_refit false keeps one fold run's weights, so it needs "
                            f"cv_folds_run: 1 (got {self.cv_folds_run})")
        return self


PRESETS: dict[str, dict] = {
    # CPU demo: trains something measurable in under a minute on 2 cores. One thread: a model this small
    # gains little from a second one, and on a busy machine two threads spin and cost several times the CPU.
    "tiny": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "context": 128, "dropout": 0.0},
             "pretrain": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 30, "max_minutes": 0.75, "threads": 1},
             # One fold of five (a fifth of the train subjects) chooses the stopping step, then the refit: within
             # a time budget every extra fold run takes steps from the refit (five folds in 0.5 min left ~30
             # steps per run, docs/baselines.md).
             "finetune": {"batch_size": 32, "lr": 3e-4, "warmup_steps": 10, "max_minutes": 0.5,
                          "eval_every": 50, "eval_histories": 500, "positive_share": 0.25, "threads": 1,
                          "cv_folds_run": 1}},
    "small": {"model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "context": 512},
              "pretrain": {"batch_size": 64, "lr": 5e-4, "warmup_steps": 500, "max_steps": 50_000, "eval_every": 500},
              "finetune": {"batch_size": 64, "lr": 1e-4}},
    # the paper's BERT baseline: 12 layers x 768, 512-token context
    "paper": {"model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context": 512},
              "pretrain": {"batch_size": 256, "lr": 1e-4, "warmup_steps": 10_000, "max_steps": 500_000,
                           "eval_every": 2000, "eval_batches": 16},
              "finetune": {"batch_size": 32, "lr": 2e-5, "warmup_steps": 200}},
}


def resolve_config(preset: str, config_path: Path | None = None):
    """(model, pretrain, finetune) configs: the preset, then a YAML with optional sections of the same names."""
    if preset not in PRESETS:
        raise UserError(f"unknown masked preset {preset!r}; expected one of {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[preset])
    if config_path is not None:
        config_path = Path(config_path)
        if not config_path.exists():
            raise UserError(f"{config_path}: no such config file")
        extra = yaml.safe_load(config_path.read_text()) or {}
        unknown = sorted(set(extra) - {"model", "pretrain", "finetune"})
        if unknown:
            raise UserError(f"{config_path}: unknown section(s) {unknown}; expected model, pretrain, finetune")
        for section, fields_ in extra.items():
            values.setdefault(section, {}).update(fields_ or {})
    source = str(config_path or f"preset {preset}")
    return (merge(MaskedModelConfig(), values.get("model"), source),
            merge(PretrainConfig(), values.get("pretrain"), source),
            merge(FinetuneConfig(), values.get("finetune"), source))


def finetune_config(run_config: dict, run: Path, config_path: Path | None = None,
                    max_minutes: float | None = None, max_steps: int | None = None) -> FinetuneConfig:
    """The run's ``finetune`` section, then ``config_path`` (``FinetuneConfig`` fields, flat or under a
    ``finetune:`` section), then ``max_minutes`` when given; ``max_steps`` when given replaces the time budget
    (``max_minutes`` then stays as given, None by default: a run of fixed length)."""
    config = merge(FinetuneConfig(), run_config.get("finetune"), f"{run}/config.yaml")
    if config_path is not None:
        from nextvisit.config import read_yaml

        extra = read_yaml(config_path)
        config = merge(config, extra.get("finetune", extra), str(config_path))
    if max_steps is not None:
        config.max_steps, config.max_minutes = max_steps, max_minutes
    elif max_minutes is not None:
        config.max_minutes = max_minutes
    return config.validate(str(config_path or f"{run}/config.yaml"))
