"""Typed configuration of the next-visit model and its training, with presets and YAML in/out.

A run's configuration is one ``RunConfig`` (model, data layout, loss, training). Presets give complete
configurations; a YAML file overrides any subset of fields (``{"model": {"n_layers": 4}}``). Unknown keys
are errors, so a typo never silently falls back to a default. Numbers follow METHOD.md §3-4; the paper's
values are marked there.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from nextvisit.errors import UserError


ATTENTION_KINDS = ("auto", "sdpa", "matmul", "flex")
# Upper edges (days, inclusive) of the visit-time head's gap bins (nextvisit.model.visit_time): single days for the
# first week (repeat visits cluster there), then coarser, up to ten years; a longer gap falls in the open bin.
VISIT_TIME_EDGES = (1, 2, 3, 4, 5, 6, 7, 10, 14, 21, 30, 45, 60, 90, 120, 150, 180, 240, 300, 365, 450, 545, 730,
                    912, 1095, 1460, 1825, 2555, 3650)


@dataclass
class ModelConfig:
    vocab_size: int = 0  # filled from the token store's vocabulary
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 4  # paper: GELU MLP 4x
    rope_base: float = 10_000.0  # rotary base over day offsets; slowest wavelength ~ 2*pi*base days
    dropout: float = 0.0
    # "auto": explicit matmul attention on CPU, SDPA otherwise (measured, docs/model.md);
    # "sdpa" (one additive mask per batch), "matmul" (the same mask, scores and softmax as plain matmuls),
    # "flex" (FlexAttention block mask; GPU)
    attention: str = "auto"
    init_std: float = 0.02
    # A learned per-token logit offset, initialised by the trainer at the code-frequency baseline (the best
    # constant logit per token). Not in the paper (no biases); it lets a small, briefly trained model start
    # from the base rates instead of spending its first steps learning them (docs/model.md).
    output_bias: bool = False
    # Horizon queries in pretraining (docs/model.md "Horizon queries"): query tokens at later days whose targets are
    # every code of the interval up to that day, the incidence question itself; the forecast then asks a horizon
    # query. Adds one learned query embedding; placement in DataConfig.horizon_query_*. On in the presets (on the
    # quality benchmark it raised zero-shot AUROC by 0.05-0.15 in every task-horizon, docs/model.md); off for configs
    # written before it.
    horizon_queries: bool = False
    # When the next visit happens (docs/model.md "Visit-time head"): a discrete-time hazard over the gap bins
    # ``visit_time_edges``, read at the last token of each visit and trained jointly (loss.visit_time_weight);
    # `nextvisit sample` needs it to roll trajectories forward. On in the presets; off for configs written before it.
    visit_time_head: bool = False
    visit_time_edges: tuple = VISIT_TIME_EDGES
    # The head reads the trunk's hidden states without training it (its loss reaches only the head), so the
    # next-visit objective is the one of a run without it; False trains the trunk for it too. On the quality
    # benchmark neither differed from a run without the head beyond pretraining's seed-to-seed variation
    # (docs/model.md "Visit-time head").
    visit_time_detach: bool = True
    # An input embedding of how often each token's code occurred before: the number of the subject's earlier visits
    # (whole record, also before the window) that hold it, in log2 buckets (model.sequence.RECURRENCE_BUCKETS), added
    # to the token's embedding, so a window of recent visits knows a code's 12th occurrence from its first
    # (docs/model.md "Recurrence embedding"). Off by default.
    recurrence_embedding: bool = False

    def validate(self):
        if self.n_layers < 1:
            raise UserError(f"model.n_layers is {self.n_layers}; the model needs at least one layer")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model {self.d_model} is not divisible by model.n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise UserError("model.d_model / model.n_heads must be even (rotary embeddings rotate pairs)")
        if self.attention not in ATTENTION_KINDS:
            raise UserError(f"model.attention is {self.attention!r}; expected one of {', '.join(ATTENTION_KINDS)}")
        edges = list(self.visit_time_edges)
        if not edges or any(int(e) != e for e in edges) or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"model.visit_time_edges must be increasing whole days from 1, got {edges}")


@dataclass
class DataConfig:
    context: int = 256  # tokens per packed context (paper: 512)
    pack: bool = True  # several subjects per context, separated by EOW, no cross-subject attention
    max_window_fraction: float = 0.5  # a packed subject window holds at most this share of the context
    query_max_tokens: int = 511  # forecasting: most recent history tokens before the query SEP (paper)
    # with model.horizon_queries: the share of training visits that ask a horizon query, and the longest gap (days)
    horizon_query_rate: float = 1.0
    horizon_query_max_days: int = 2190
    # draws per visit, each asked with horizon_query_rate at its own gap: more incidence questions per step for the
    # price of one token and one head row each (3 lost 0.014-0.033 AUROC against 1 on the quality benchmark)
    horizon_queries_per_visit: int = 1
    # a window (or forecast) that starts after the first visit is preceded by the first occurrence of each code and
    # demographic token before it, at most this many tokens (0 = off; docs/model.md "History summary")
    history_summary_tokens: int = 0


@dataclass
class LossConfig:
    kind: str = "focal"  # "focal" (paper) or "bce"
    gamma: float = 2.0  # paper
    alpha: float = 0.995  # paper: weight of positives
    scale: float = 10.0  # paper
    repeat_decay: float = 0.5  # paper: weight decay^(c-1) for a positive seen c-1 times before as a target
    repeat_floor: float = 0.1  # paper
    # Validation code-frequency bands: a token's share of train visits that hold it. Band i covers
    # [edges[i], edges[i-1]); e.g. common >= 1%, mid 0.1%-1%, rare < 0.1%.
    frequency_band_edges: tuple = (0.01, 0.001)
    # weight of the visit-time head's loss (mean negative log-likelihood per visit, nats) in the total; the next-visit
    # loss is a mean per (SEP, token) pair, about a hundredth of it, so 0.01 puts the two on one scale
    visit_time_weight: float = 0.01

    def validate(self):
        if self.kind not in ("focal", "bce"):
            raise UserError(f"loss.kind is {self.kind!r}; expected 'focal' or 'bce'")
        if not 0 < self.alpha < 1:
            raise UserError(f"loss.alpha must be in (0, 1), got {self.alpha}")
        if not (0 < self.repeat_decay <= 1 and 0 <= self.repeat_floor <= 1):
            raise UserError("loss.repeat_decay must be in (0, 1] and loss.repeat_floor in [0, 1]")
        if not self.visit_time_weight >= 0:
            raise UserError(f"loss.visit_time_weight must be at least 0, got {self.visit_time_weight}")


@dataclass
class TrainConfig:
    batch_contexts: int = 16  # contexts per optimizer step, over all processes and accumulation steps
    micro_batch: int = 16  # contexts per forward pass per process
    max_steps: int = 100_000  # the run ends at max_steps or at --max-minutes, whichever comes first
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    decay_steps: int = 3000  # cosine from lr to min_lr over this many steps after warm-up, then flat
    weight_decay: float = 0.01  # on matrices only (paper)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16" or "fp32"
    eval_every: int = 100  # steps between validations on the tuning split
    eval_contexts: int = 64  # tuning contexts per validation (0 = the whole split)
    checkpoint_every: int = 100  # steps between checkpoints (also at the end and at the time budget)
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: torch's default, which a new run writes to its config.yaml
    # 0: off. Otherwise the run's weights (model.safetensors, and every validation) are an exponential moving average
    # of the trained weights, updated after every optimizer step with this decay (docs/model.md, "Weight averaging")
    ema_decay: float = 0.0

    def validate(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"train.precision is {self.precision!r}; expected auto, bf16 or fp32")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay is {self.ema_decay}; expected 0 (off) or a decay in (0, 1)")
        if self.micro_batch <= 0 or self.batch_contexts <= 0:
            raise UserError("train.micro_batch and train.batch_contexts must be positive")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.loss.validate()
        self.train.validate()
        if self.data.context < 8:
            raise UserError(f"data.context {self.data.context} is too small")
        if self.data.history_summary_tokens < 0 or self.data.history_summary_tokens >= self.data.context // 2:
            raise UserError(f"data.history_summary_tokens {self.data.history_summary_tokens} must be in "
                            f"[0, data.context / 2)")
        if not 0 < self.data.horizon_query_rate <= 1 or self.data.horizon_query_max_days < 1:
            raise UserError("data.horizon_query_rate must be in (0, 1] and data.horizon_query_max_days at least 1")
        if not 1 <= self.data.horizon_queries_per_visit <= 16:
            raise UserError(f"data.horizon_queries_per_visit is {self.data.horizon_queries_per_visit}; expected 1 to 16")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        data = self.to_dict()
        data["loss"]["frequency_band_edges"] = list(data["loss"]["frequency_band_edges"])
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        return merge(cls(), data, source).validate()

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(read_yaml(path), source=str(path))


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)}); fix the syntax there") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, data, loss, train)")
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is, on one line.

    >>> try:
    ...     yaml.safe_load("a: [1, 2")
    ... except yaml.YAMLError as exc:
    ...     print(yaml_problem(exc))
    line 1, column 9: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 1)
    """
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    opened = f" ({exc.context} at line {context.line + 1})" if context is not None and exc.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{opened}"


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a misspelt ``name``, else nothing.

    >>> did_you_mean("min_cout", ["min_count", "max_time"])
    " (did you mean 'min_count'?)"
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value, name: str, source: str, whole: bool):
    """``value`` as a number. YAML 1.1 reads ``3e-4`` (no dot) as text, so numeric text is accepted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{source}: {name} must be a number, got {value!r}")
    if whole and not float(value).is_integer():
        raise UserError(f"{source}: {name} must be a whole number, got {value!r}")
    return int(value) if whole else float(value)


def merge(base, overrides: dict | None, source: str, prefix: str = ""):
    """A copy of dataclass ``base`` with ``overrides`` applied: the one merge rule of every config (runs,
    tokenizer, baselines). Unknown fields, wrong types and nulls for required settings raise a ``UserError``
    naming ``source`` and the field; null switches an optional setting (declared ``... | None``) off."""
    if overrides is not None and not isinstance(overrides, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping of fields, got {overrides!r}")
    result = copy.deepcopy(base)
    known = {f.name: f for f in fields(result)}
    for key, value in (overrides or {}).items():
        name = f"{prefix}{key}"
        if key not in known:
            raise UserError(f"{source}: unknown field {name!r}{did_you_mean(key, known)}; known: "
                            f"{', '.join(sorted(known))}")
        current, declared = getattr(result, key), str(known[key].type)
        if is_dataclass(current):
            setattr(result, key, merge(current, value if value is not None else {}, source, prefix=f"{name}."))
            continue
        if value is None:
            if current is not None and "None" not in declared:
                raise UserError(f"{source}: {name} cannot be null; give a value or leave the field out")
        elif isinstance(current, (list, tuple)) or (current is None and declared.startswith(("tuple", "list"))):
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{source}: {name} must be a list, got {value!r}")
            numbers = [v for v in (current or ()) if v is not None]
            if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                whole = all(isinstance(v, int) for v in numbers)
                value = [v if v is None else _number(v, f"{name}[{i}]", source, whole) for i, v in enumerate(value)]
            value = tuple(value) if isinstance(current, tuple) or current is None else list(value)
        elif isinstance(current, bool) or (current is None and declared.startswith("bool")):
            if not isinstance(value, bool):
                raise UserError(f"{source}: {name} must be true or false, got {value!r}")
        elif isinstance(current, (int, float)) or (current is None and declared.split()[0] in ("int", "float")):
            whole = isinstance(current, int) if current is not None else declared.startswith("int")
            value = _number(value, name, source, whole)
        setattr(result, key, value)
    return result


# -- presets -----------------------------------------------------------------------------------------------
# tiny: the CPU demo (learns something measurable in minutes on 2 cores).
# small: a workstation / single GPU model, 8 x 8 x 512 (paper's 47M-parameter size at its vocabulary).
# paper: 8 layers x 8 heads x 1024 wide, 512-token contexts, 65,536 tokens per optimizer step (paper).
PRESETS: dict[str, dict] = {
    "tiny": {
        # 96 wide x 2 layers at lr 4e-3: in the quality benchmark's 8 CPU minutes it runs about twice the steps of
        # 128 x 3 (4,581 against 2,200) and gained 0.045 and 0.026 AUROC on knee OA, dementia level within 0.013
        # (docs/model.md, "Zero-shot levers: measured")
        "model": {"d_model": 96, "n_layers": 2, "n_heads": 4, "output_bias": True, "visit_time_head": True,
                  "horizon_queries": True},
        # forecasts read twice the longest training window (128 tokens incl. its closing token): on the quality
        # benchmark 255 tokens beat 127 on dementia (+0.017 and +0.010 AUROC, paired intervals above 0) and were level
        # on knee OA (docs/model.md, "Zero-shot levers: measured")
        "data": {"context": 256, "query_max_tokens": 255},
        "train": {"batch_contexts": 16, "micro_batch": 16, "lr": 4e-3, "min_lr": 4e-4, "warmup_steps": 30,
                  "decay_steps": 2000, "eval_every": 50, "eval_contexts": 48, "checkpoint_every": 100},
    },
    "small": {
        "model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "visit_time_head": True, "horizon_queries": True},
        "data": {"context": 512},
        "train": {"batch_contexts": 64, "micro_batch": 16, "lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 500,
                  "decay_steps": 20_000, "eval_every": 500, "eval_contexts": 256, "checkpoint_every": 500},
    },
    "paper": {
        "model": {"d_model": 1024, "n_layers": 8, "n_heads": 8, "visit_time_head": True, "horizon_queries": True},
        "data": {"context": 512},
        "train": {"batch_contexts": 128, "micro_batch": 32, "lr": 2.2e-4, "min_lr": 2.2e-5,
                  "warmup_steps": 20_000, "decay_steps": 200_000, "max_steps": 220_000, "eval_every": 2000,
                  "eval_contexts": 1024, "checkpoint_every": 2000},
    },
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name], source=f"preset {name}")


def resolve(preset_name: str = "tiny", config_path: Path | dict | None = None) -> RunConfig:
    """Preset, then the overrides of a YAML file (or of a mapping of the same sections, e.g. from Python)."""
    config = preset(preset_name)
    if isinstance(config_path, dict):
        config = merge(config, config_path, "config").validate()
    elif config_path is not None:
        config = merge(config, read_yaml(config_path), str(config_path)).validate()
    return config
