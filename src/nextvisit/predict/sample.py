"""``nextvisit sample``: Monte Carlo next-visit trajectories, and the incidence risks they give (METHOD.md §5,
docs/sampling.md).

For each labelled history (cut at its prediction time as ``forecast`` cuts it: ``nextvisit.predict.horizon``),
N trajectories are rolled forward visit by visit until the row's longest horizon, death, or the end of what the
visit-time head can say:

1. the day of the next visit from the visit-time head at the last token of the latest visit (a discrete-time
   hazard; the first gap is drawn given that no visit happened up to the prediction day);
2. the visit's codes from the next-visit head at a SEP on that day: one Bernoulli per predicted token at
   ``sigmoid(logit / temperature)``, untruncated (no top-k, no top-p). An all-empty draw (the head's tokens are
   independent, a real visit holds at least one code) is redrawn, and counted;
3. the visit (its age-bucket token, then the codes in id order, as the tokenizer writes a visit) is appended,
   and the loop goes on. ``MEDS_DEATH`` in a visit ends the trajectory there.

Every trajectory's draws come from its own generator, seeded by (seed, subject, prediction time, sample index),
in a fixed order (two uniforms for the gap, one per predicted token for the codes), so a trajectory is the same
whatever else is in its batch (up to float rounding of the model's probabilities).

The history is encoded once per batch and its keys and values are shared by its samples (``KVCache``); each step
encodes only the new SEP and the new visit. A trajectory that outgrows the context the run forecasts with
(``data.query_max_tokens`` + 1) is re-encoded from its most recent visits filling ``keep_fraction`` of it (a
slide, counted). With ``cache=False`` every step re-encodes the whole window instead (the reference the KV cache
must equal; ``benchmarks/sample.py`` times both).

Risks for a label row with horizon H (onsets in ``(t, t + H]``; the histories hold no code of the condition:
prevalent cases are excluded by the task):

- ``monte_carlo``: the share of the N trajectories with a condition code at a visit in the interval;
- ``rao_blackwell``: the mean over trajectories of the sum, over the visits in the interval up to and including
  the first sampled onset, of the model's own probability of an onset at that visit,
  p = 1 - prod over the condition's tokens of (1 - p_token). The expected value of this sum is the probability
  of an onset within H (each term is the chance that the onset happens first at that visit given the path so
  far), on the same samples as ``monte_carlo``, with lower variance: a trajectory contributes its hazards, not a
  0 or 1. (1 - prod(1 - p) over the visits is the same figure when the path is drawn with the onset excluded;
  on unconditioned paths it is biased, so it is not used.)

A trajectory whose last known day is before a row's horizon without an onset (it reached ``max_visits``, or the
visit-time head put its next visit past its last bin before the horizon) is undecided for that row: counted
in ``undecided`` per row and in sampling.json, and counted as no onset in both estimates (never dropped).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nextvisit.artifacts.folders import atomic_folder, check_out
from nextvisit.artifacts.predictions import ZERO_SHOT, prediction_frame, write_predictions
from nextvisit.compare import Labels
from nextvisit.data import meds
from nextvisit.data.histories import add_counts, read_histories
from nextvisit.errors import UserError
from nextvisit.model.losses import implied_probability, repeat_weight
from nextvisit.model.run import NextVisitRun, autocast_for, check_precision
from nextvisit.model.sequence import HistorySummary, recent_start, visit_cap, window_arrays
from nextvisit.model.visit_time import edges_tensor, open_bin_probability, sample_gaps
from nextvisit.predict.horizon import no_visit_rows, rows_to_score, tokenized_histories
from nextvisit.predict.scoring import SCORED_SPLITS, condition_token_ids, parse_splits
from nextvisit.tokenize.store import NO_DAY, SEP, Subject

_EPOCH = date(1970, 1, 1)
ESTIMATORS = ("monte_carlo", "rao_blackwell")
TRAJECTORIES = "trajectories"  # TRAJ/trajectories/<sample index>.parquet
SAMPLING_FILE = "sampling.json"
VISIT_TIME_CALIBRATION = "visit_time_calibration.json"  # written by pretraining (nextvisit.train.loop)
# why a trajectory stopped: past its longest horizon (decided), death (decided), no further visit within the
# visit-time head's last bin (decided when that lies past the horizon), max_visits (undecided where it falls short)
END_REASONS = ("horizon", "death", "no_further_visit", "max_visits")
DEATH_KNOWN = 2**62  # ``known_until`` of a trajectory that ended in death
TRAJECTORY_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                               ("numeric_value", pa.float32()), ("text_value", pa.string()),
                               ("prediction_time", pa.timestamp("us"))])


@dataclass
class SampleConfig:
    samples: int = 16  # trajectories per (subject, prediction time)
    temperature: float = 1.0  # the codes' logits are divided by it; 1 = the model's own probabilities
    seed: int = 0
    batch_size: int = 256  # trajectories advanced together (rows of the KV cache; bounds memory)
    max_visits: int = 500  # generated visits per trajectory; one still short of a horizon then is undecided
    # A slide re-encodes the most recent visits filling this share of the window. 0.5 rather than 0.75: tiny's
    # KV-cached roll ran 6.7x the recompute instead of 3.8x (slides every ~5 visits instead of ~2.6, docs/sampling.md),
    # and the windows a trajectory reads (up to 64 tokens right after a slide, growing to the whole window) stay
    # within what training SEPs see (0 to the context length).
    keep_fraction: float = 0.5
    max_redraws: int = 64  # redraws of an all-empty code draw; still empty after them: kept empty, counted
    splits: tuple[str, ...] = SCORED_SPLITS
    # float32 by default: under bfloat16 autocast a draw near its probability can flip with the batch's rounding
    # (1-3 of 64 trajectories differed between cached and recomputed rolls), and float32 ran faster on this CPU
    # (benchmarks/sample.py); "auto" and "bf16" as in forecast
    precision: str = "fp32"
    cache: bool = True  # False: re-encode the whole window at every step (the reference for the KV cache)
    histories_per_chunk: int = 1024  # label histories read and tokenized at once
    write_trajectories: bool = True
    # also write the risks of the first k samples of each history, for each k here (below ``samples``): the cost
    # of N measured on one run (OUT/monte_carlo_n{k}, OUT/rao_blackwell_n{k})
    sample_counts: tuple[int, ...] = ()

    def validate(self) -> "SampleConfig":
        if self.samples < 1 or self.batch_size < 1 or self.max_visits < 1 or self.max_redraws < 0:
            raise UserError("--samples, --batch-size and --max-visits must be at least 1")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be above 0, got {self.temperature}")
        if any(not 1 <= k <= self.samples for k in self.sample_counts):
            raise UserError(f"--sample-counts {list(self.sample_counts)}: each must be in 1..--samples ({self.samples})")
        if not 0 < self.keep_fraction < 1:
            raise UserError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
        check_precision(self.precision)
        return self


@dataclass
class History:
    """One labelled history: its tokens, the prediction day and the horizons (days) of its label rows."""

    subject: Subject
    subject_id: int
    prediction_time: datetime
    horizons: list[int]

    @property
    def prediction_day(self) -> int:
        return (self.prediction_time.date() - _EPOCH).days

    @property
    def end_day(self) -> int:
        return self.prediction_day + max(self.horizons)


def trajectory_seed(seed: int, subject_id: int, prediction_time: datetime, sample: int) -> np.random.SeedSequence:
    """The seed of one trajectory: a function of (seed, subject, prediction time, sample index) only."""
    micros = int((prediction_time - datetime(1970, 1, 1)).total_seconds() * 1_000_000) + (1 << 62)
    return np.random.SeedSequence([int(seed) & (2**63 - 1), int(subject_id) & (2**63 - 1), micros, int(sample)])


@dataclass
class Trajectory:
    history: History
    sample: int
    rng: np.random.Generator
    days: list = field(default_factory=list)  # generated visit days (days since 1970)
    visits: list = field(default_factory=list)  # generated visit tokens (age token first)
    hazards: list = field(default_factory=list)  # (day, P(onset at that visit)) up to the first onset
    onset_day: int | None = None
    end: str | None = None
    known_until: int = 0  # the trajectory says what happens up to this day
    first_open_mass: float | None = None  # P(no visit within the head's last bin) at the first gap
    closing: tuple | None = None  # (day, tokens) of the visit past the horizon, written out, never counted
    start: int = 0  # first visit of the encoded window (history visits, then generated ones)
    origin: int = 0  # day of that visit: rotary days are relative to it
    summary_tokens: int = 0  # history-summary tokens ahead of the window (not counted against the context)
    window_cost: int = 0  # tokens of the window's visits, one SEP each (``window_cost``; the context rule)
    window_counts: np.ndarray | None = None  # per token: target visits of the window holding it (repeat weights)
    slides: int = 0
    redraws: int = 0
    empty_visits: int = 0
    truncated_visits: int = 0

    @property
    def last_day(self) -> int:
        return int(self.days[-1]) if self.days else int(self.history.subject.visit_days[-1])

    def record(self) -> Subject:
        """The history and the generated visits as one subject (what a window is cut from)."""
        s = self.history.subject
        if not self.visits:
            return s
        lengths = np.concatenate([np.diff(s.visit_offsets), [len(v) for v in self.visits]])
        return Subject(subject_id=s.subject_id, birth_day=s.birth_day,
                       visit_days=np.concatenate([s.visit_days, np.asarray(self.days, s.visit_days.dtype)]),
                       visit_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       tokens=np.concatenate([s.tokens, *[np.asarray(v, s.tokens.dtype) for v in self.visits]]))


@dataclass
class Counts:
    trajectories: int = 0
    visits: int = 0
    generated_tokens: int = 0
    slides: int = 0
    redraws: int = 0
    empty_visits: int = 0
    truncated_visits: int = 0
    undecided: int = 0  # (trajectory, label row) pairs short of the row's horizon without an onset
    ended: dict = field(default_factory=lambda: {reason: 0 for reason in END_REASONS})
    open_mass_sum: float = 0.0

    def mean_first_open_mass(self) -> float:
        return self.open_mass_sum / max(self.trajectories, 1)

    def add(self, t: Trajectory) -> None:
        self.open_mass_sum += t.first_open_mass or 0.0
        self.trajectories += 1
        self.visits += len(t.visits)
        self.generated_tokens += sum(len(v) for v in t.visits)
        self.slides += t.slides
        self.redraws += t.redraws
        self.empty_visits += t.empty_visits
        self.truncated_visits += t.truncated_visits
        self.ended[t.end] += 1


class Sampler:
    """Rolls trajectories of a next-visit run with the visit-time head (module docstring)."""

    def __init__(self, model, vocab, tokenizer, run_config, config: SampleConfig, condition_ids: torch.Tensor):
        if model.visit_time is None:
            raise UserError("the run has no visit-time head (model.visit_time_head: false; runs pretrained before it "
                            "existed), so it cannot say when the next visit happens; pretrain again (the presets "
                            "have the head) or score the labels with `nextvisit forecast` instead")
        if model.config.recurrence_embedding:
            raise UserError("the run reads recurrence buckets (model.recurrence_embedding: true), which the sampler "
                            "does not yet compute for the visits it generates; score the labels with "
                            "`nextvisit forecast` instead")
        self.model, self.vocab, self.tokenizer, self.config = model, vocab, tokenizer, config.validate()
        self.loss = run_config.loss
        self.device = next(model.parameters()).device
        self.autocast, self.precision = autocast_for(config.precision, self.device)
        self.limit = run_config.data.query_max_tokens + 1  # the window a forecast reads, its closing SEP included
        self.cap = visit_cap(self.limit)
        self.keep = max(1, int(config.keep_fraction * self.limit))
        self.summary = HistorySummary.of(vocab, run_config.data.history_summary_tokens)
        summary_room = self.summary.max_tokens if self.summary is not None else 0
        self.capacity = self.limit + summary_room + self.cap + 2
        supervised = vocab.supervised_mask()
        self.supervised_ids = torch.from_numpy(np.flatnonzero(supervised)).to(self.device)
        position = np.full(len(vocab), -1)
        position[np.flatnonzero(supervised)] = np.arange(int(supervised.sum()))
        condition = position[condition_ids.cpu().numpy()]
        self.condition_columns = torch.from_numpy(condition[condition >= 0]).to(self.device)
        self.death_id = vocab.id(meds.DEATH_CODE) if meds.DEATH_CODE in vocab.tokens else None
        self.death_column = int(position[self.death_id]) if self.death_id is not None and position[self.death_id] >= 0 else None
        self.edges = edges_tensor(model.config.visit_time_edges, self.device)
        self.last_edge = int(model.config.visit_time_edges[-1])

    # -- encoding ---------------------------------------------------------------------------------------------

    def _encode(self, trajectories: list[Trajectory], query_days: list[int] | None = None):
        """Encode each trajectory's window (visits ``start..``; a query SEP at ``query_days[i]``, absolute, when
        given) from scratch: (cache, hidden states at each row's last token [R, D])."""
        rows = []
        for i, t in enumerate(trajectories):
            record = t.record()
            t.origin = int(record.visit_days[t.start])
            query = None if query_days is None else int(query_days[i]) - t.origin
            tokens, days, att_days = window_arrays(record, t.start, self.limit, self.summary, query_day=query)
            t.summary_tokens = int(np.sum(days < 0)) if t.start > 0 else 0
            t.window_cost = _window_cost(record, t.start, self.cap)
            # the window's target visits (all but its first): how often each token was a positive target before,
            # as the loss's repeat weight saw it (``Batch.target_repeats``)
            # (the tokens the model reads: a visit past the cap keeps its first ``cap``, as training's windows do)
            targets = [record.tokens[a:min(b, a + self.cap)] for a, b in
                       zip(record.visit_offsets[t.start + 1:-1], record.visit_offsets[t.start + 2:])]
            t.window_counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *targets]).astype(np.int64),
                                          minlength=len(self.vocab)).astype(np.int32)
            rows.append((tokens, days, att_days))
        k = max(len(r[0]) for r in rows)
        R = len(rows)
        tokens = np.zeros((R, k), np.int64)
        days = np.zeros((R, k), np.int64)
        att = np.zeros((R, k), np.int64)
        counts = np.zeros(R, np.int64)
        for i, (tk, dy, at) in enumerate(rows):
            n = len(tk)
            tokens[i, :n], days[i, :n], att[i, :n], counts[i] = tk, dy, at, n
            days[i, n:], att[i, n:] = dy[-1], at[-1]
        cache = self.model.new_cache(R, self.capacity, self.device, self._dtype())
        counts_t = torch.from_numpy(counts).to(self.device)
        with self.autocast():
            hidden = self.model.extend(cache, torch.from_numpy(tokens).to(self.device),
                                       torch.from_numpy(days).float().to(self.device),
                                       torch.from_numpy(att).to(self.device), counts_t)
        return cache, hidden[torch.arange(R, device=self.device), counts_t - 1].float()

    def _dtype(self):
        with self.autocast():
            if torch.is_autocast_enabled(self.device.type):
                return torch.get_autocast_dtype(self.device.type)
        return self.model.embed.weight.dtype

    def _extend(self, cache, trajectories: list[Trajectory], blocks: list[np.ndarray], days: list[int],
                sep: bool) -> torch.Tensor:
        """Append a SEP (``sep``; at each row's ``days``) or a visit's tokens to every row; hidden states at each
        row's last new token [R, D]."""
        R = len(trajectories)
        k = max(1, max(len(b) for b in blocks))  # rows with no block (re-encoded instead) keep their cache
        tokens = np.zeros((R, k), np.int64)
        counts = np.zeros(R, np.int64)
        rel = np.asarray([d - t.origin for d, t in zip(days, trajectories)], np.int64)
        for i, b in enumerate(blocks):
            tokens[i, :len(b)], counts[i] = b, len(b)
        day = np.repeat(rel[:, None], k, 1)
        att = day - 1 if sep else day
        counts_t = torch.from_numpy(counts).to(self.device)
        with self.autocast():
            hidden = self.model.extend(cache, torch.from_numpy(tokens).to(self.device),
                                       torch.from_numpy(day).float().to(self.device),
                                       torch.from_numpy(att).to(self.device), counts_t)
        return hidden[torch.arange(R, device=self.device), counts_t - 1].float()

    def _slide(self, t: Trajectory) -> None:
        """Move the window start so the most recent visits fill ``keep`` tokens (the next encode re-reads them)."""
        record = t.record()
        t.start = max(t.start, recent_start(np.diff(record.visit_offsets), self.keep, self.limit))
        t.slides += 1

    # -- rolling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def roll(self, histories: list[History], progress=None) -> list[Trajectory]:
        """Every sample of every history, finished (``end`` set), in (history, sample) order."""
        config = self.config
        out: list[Trajectory] = []
        per_batch = max(1, config.batch_size // config.samples)
        for begin in range(0, len(histories), per_batch):
            group = histories[begin:begin + per_batch]
            trajectories = [Trajectory(h, s, np.random.Generator(np.random.Philox(
                trajectory_seed(config.seed, h.subject_id, h.prediction_time, s))))
                for h in group for s in range(config.samples)]
            for first in range(0, len(trajectories), config.batch_size):
                self._roll_batch(trajectories[first:first + config.batch_size], progress)
            out.extend(trajectories)
        return out

    def _start(self, trajectories: list[Trajectory]):
        """Encode each distinct history once; its samples share the keys and values (rows repeated)."""
        distinct: dict[int, int] = {}
        firsts = []
        for t in trajectories:
            if id(t.history) not in distinct:
                distinct[id(t.history)] = len(firsts)
                firsts.append(t)
            lengths = np.diff(t.history.subject.visit_offsets)
            t.start = recent_start(lengths, self.limit, self.limit)  # as a forecast reads it
        cache, last = self._encode(firsts)
        for t in trajectories:
            first = firsts[distinct[id(t.history)]]
            t.origin, t.summary_tokens, t.window_cost = first.origin, first.summary_tokens, first.window_cost
            t.window_counts = first.window_counts.copy()
        index = torch.tensor([distinct[id(t.history)] for t in trajectories], device=self.device)
        return cache.select(index), last.index_select(0, index)

    def _roll_batch(self, trajectories: list[Trajectory], progress) -> None:
        """Roll one batch to its end. The context rule, the same with and without the cache: before a SEP, the
        window (its visits, one SEP each) must fit ``limit`` tokens, else it slides to the most recent visits
        filling ``keep`` (and is re-encoded); a visit is always appended (the cache has room for one more)."""
        config = self.config
        cache, last_hidden = self._start(trajectories)
        active = list(trajectories)
        while active:
            # 1. when: the visit-time head at the last token of the latest visit
            with self.autocast():
                time_logits = self.model.visit_time(last_hidden.to(self._dtype())).float()
            min_gaps = torch.tensor([max(1, t.history.prediction_day - t.last_day + 1) for t in active],
                                    device=self.device)
            uniforms = torch.from_numpy(np.stack([t.rng.random(2) for t in active])).to(self.device)
            gaps = sample_gaps(time_logits, self.edges, min_gaps, uniforms).cpu().numpy()
            open_mass = open_bin_probability(time_logits, self.edges, min_gaps).cpu().numpy()
            for t, mass in zip(active, open_mass):
                if t.first_open_mass is None:
                    t.first_open_mass = float(mass)
            going, days = [], []
            for i, (t, gap) in enumerate(zip(active, gaps)):
                if gap == 0:  # no further visit within the last bin
                    t.end, t.known_until = "no_further_visit", t.last_day + self.last_edge
                    continue
                day = t.last_day + int(gap)
                if day > t.history.end_day:
                    t.known_until = day - 1
                    t.closing = (day, None)  # its codes are drawn below, written out, never counted
                going.append(i)
                days.append(day)
            self._progress(progress, len(active) - len(going))
            if not going:
                break
            if len(going) < len(active):
                index = torch.tensor(going, device=self.device)
                cache = cache.select(index) if config.cache else cache
                active = [active[i] for i in going]
            # 2. what: a SEP on that day (sliding the windows that would not fit), the codes drawn there
            full = [j for j, t in enumerate(active) if t.window_cost > self.limit]
            for j in full:
                self._slide(active[j])
            if config.cache:
                sliding = set(full)
                blocks = [np.zeros(0, np.int64) if j in sliding else np.array([SEP]) for j in range(len(active))]
                sep_hidden = self._extend(cache, active, blocks, days, sep=True)
                if full:
                    sub, hidden = self._encode([active[j] for j in full], query_days=[days[j] for j in full])
                    rows = torch.tensor(full, device=self.device)
                    cache.replace_rows(rows, sub)
                    sep_hidden[rows] = hidden
            else:
                _, sep_hidden = self._encode(active, query_days=days)
            visits, onsets, p_onset, deaths = self._draw_codes(active, sep_hidden, days)
            # 3. the visit joins the trajectory (and, below, the cache)
            continuing = []
            for j, (t, day) in enumerate(zip(active, days)):
                tokens = visits[j]
                if t.closing is not None:
                    t.closing, t.end = (day, tokens), "horizon"
                    continue
                t.days.append(day)
                t.visits.append(tokens)
                t.window_cost += min(len(tokens), self.cap) + 1
                t.window_counts[tokens[:self.cap]] += 1
                t.known_until = day
                if t.onset_day is None:
                    t.hazards.append((day, float(p_onset[j])))
                    if onsets[j]:
                        t.onset_day = day
                if len(tokens) > self.cap:
                    t.truncated_visits += 1
                if deaths[j]:
                    t.end, t.known_until = "death", DEATH_KNOWN  # nothing happens after death: decided
                elif len(t.visits) >= config.max_visits:
                    t.end = "max_visits"
                else:
                    continuing.append(j)
            self._progress(progress, len(active) - len(continuing))
            if not continuing:
                break
            if len(continuing) < len(active):
                cache = cache.select(torch.tensor(continuing, device=self.device)) if config.cache else cache
                active = [active[j] for j in continuing]
            if config.cache:
                blocks = [np.asarray(t.visits[-1][:self.cap], np.int64) for t in active]
                last_hidden = self._extend(cache, active, blocks, [t.days[-1] for t in active], sep=False)
            else:
                _, last_hidden = self._encode(active)

    @staticmethod
    def _progress(progress, finished: int) -> None:
        if progress is not None and finished:
            progress.update(finished)

    def _draw_codes(self, rows: list[Trajectory], sep_hidden: torch.Tensor, days: list[int]):
        """The codes of the next visit of each row, drawn at its SEP: (visit tokens per row, onset drawn, P(onset),
        death drawn)."""
        config = self.config
        with self.autocast():
            logits = self.model.next_visit_logits(sep_hidden.to(self._dtype())).float()
        # the probability each logit stands for under the run's loss (focal loss does not give sigmoid(logit)),
        # with the repeat weight the loss gave a token already a target in the window; then the temperature
        ids_np = self.supervised_ids.cpu().numpy()
        repeats = torch.from_numpy(np.stack([t.window_counts[ids_np] for t in rows])).to(self.device)
        loss = self.loss
        # a floor of 0 would read a much-repeated token back at probability 1: keep the weight positive
        weight = repeat_weight(repeats, loss.repeat_decay, loss.repeat_floor).double().clamp(min=1e-6)
        probs = implied_probability(logits.index_select(1, self.supervised_ids), loss.kind, loss.gamma, loss.alpha,
                                    weight)
        if config.temperature != 1.0:
            probs = torch.sigmoid(torch.logit(probs) / config.temperature)  # [R, S]
        S = probs.shape[1]
        uniforms = torch.from_numpy(np.stack([t.rng.random(S) for t in rows])).to(self.device)
        drawn = uniforms < probs
        for _ in range(config.max_redraws):
            empty = torch.nonzero(~drawn.any(1)).flatten().tolist()
            if not empty:
                break
            for j in empty:
                rows[j].redraws += 1
                drawn[j] = torch.from_numpy(rows[j].rng.random(S)).to(self.device) < probs[j]
        cond = probs.index_select(1, self.condition_columns)
        p_onset = -torch.expm1(torch.log1p(-cond.clamp(max=1 - 1e-15)).sum(1))
        # the visit is drawn again while empty (at most max_redraws times), so an onset has that many more chances:
        # P(onset in the kept draw) = p_onset (1 - q^(M+1)) / (1 - q), q = P(an empty draw)
        log_q = torch.log1p(-probs.clamp(max=1 - 1e-15)).sum(1)
        retries = torch.where(log_q < -40, torch.ones_like(log_q),
                              torch.expm1((config.max_redraws + 1) * log_q) / torch.expm1(log_q))
        p_onset = (p_onset * retries).clamp(max=1.0).cpu().numpy()
        onsets = drawn.index_select(1, self.condition_columns).any(1).cpu().numpy()
        deaths = drawn[:, self.death_column].cpu().numpy() if self.death_column is not None else np.zeros(len(rows), bool)
        ids = self.supervised_ids.cpu().numpy()
        drawn_np = drawn.cpu().numpy()
        births = np.asarray([t.history.subject.birth_day for t in rows], np.int64)
        ages = self.tokenizer.age_token_ids(births, np.asarray(days, np.int64), births != NO_DAY)
        visits = []
        for j, t in enumerate(rows):
            codes = ids[drawn_np[j]]
            if len(codes) == 0:
                t.empty_visits += 1
            visits.append(np.concatenate([[ages[j]], codes]).astype(np.int64))
        return visits, onsets, p_onset, deaths


def _window_cost(record: Subject, start: int, cap: int) -> int:
    lengths = np.minimum(np.diff(record.visit_offsets)[start:], cap)
    return int(lengths.sum() + len(lengths))


# -- risks and files --------------------------------------------------------------------------------------------


def risks(trajectories: list[Trajectory], horizon: int) -> tuple[float, float, int]:
    """(monte_carlo, rao_blackwell, undecided) over the trajectories of one history at horizon ``horizon``."""
    if not trajectories:
        raise ValueError("no trajectories")
    end = trajectories[0].history.prediction_day + horizon
    mc = rb = 0.0
    undecided = 0
    for t in trajectories:
        onset = t.onset_day is not None and t.onset_day <= end
        mc += onset
        rb += sum(p for day, p in t.hazards if day <= end)
        undecided += (not onset) and t.known_until < end
    n = len(trajectories)
    return mc / n, min(rb / n, 1.0), undecided


def trajectory_events(trajectories: list[Trajectory], vocab) -> dict[int, pa.Table]:
    """Per sample index, the generated events in the MEDS data schema plus ``prediction_time`` (one row per
    code; lab tokens give their code, with the bin in ``text_value``; age-bucket tokens are not events). The
    visit past the horizon that stopped a trajectory is written too, so a labeller sees time pass the horizon."""
    kinds = vocab.kinds
    by_sample: dict[int, dict[str, list]] = {}
    for t in trajectories:
        columns = by_sample.setdefault(t.sample, {name: [] for name in TRAJECTORY_SCHEMA.names})
        visits = list(zip(t.days, t.visits))
        if t.closing is not None and t.closing[1] is not None:
            visits.append(t.closing)
        for day, tokens in visits:
            when = datetime(1970, 1, 1) + (date.fromordinal(_EPOCH.toordinal() + int(day)) - _EPOCH)
            for token in tokens:
                if kinds[token] not in ("code", "lab"):
                    continue
                text = vocab.tokens[token]
                code, value_bin = (text.rsplit("|", 1) if kinds[token] == "lab" else (text, ""))
                columns["subject_id"].append(t.history.subject_id)
                columns["time"].append(when)
                columns["code"].append(code)
                columns["numeric_value"].append(None)
                columns["text_value"].append(value_bin or None)
                columns["prediction_time"].append(t.history.prediction_time)
    return {s: pa.table(c, schema=TRAJECTORY_SCHEMA) for s, c in by_sample.items()}


def sample(run: Path | NextVisitRun, meds_dir: Path, labels_dir: Path | Labels, out: Path, config: SampleConfig,
           device=None, overwrite: bool = False, progress: bool = True) -> dict:
    """Roll the trajectories of every labelled row of ``config.splits``; write TRAJ (docs/interfaces.md §6).
    ``run``: a run folder (loaded on ``device``) or a run loaded already; ``labels_dir``: a labels folder or
    labels loaded already (``compare.Labels``)."""
    from tqdm import tqdm

    config.validate()
    check_out(out, overwrite)
    started = time.monotonic()
    loaded = NextVisitRun.of(run, device)
    model, vocab, run_config, tokenizer, run = loaded.model, loaded.vocab, loaded.config, loaded.tokenizer, loaded.path
    labels = Labels.of(labels_dir, require_train=False)
    task = labels.task
    condition_ids = condition_token_ids(task, vocab, "the run's vocabulary")
    sampler = Sampler(model, vocab, tokenizer, run_config, config, condition_ids)
    rows, skipped = rows_to_score(labels.rows.drop("row", "history_id"), config.splits)
    histories = rows.group_by("subject_id", "prediction_time", maintain_order=True).agg(
        pl.col("horizon_days").unique().sort().alias("horizons")).sort("subject_id", "prediction_time") \
        .with_row_index("history_id")
    from nextvisit.data.histories import history_table

    table = history_table(rows)
    horizons_of = {(s, p): h for s, p, h in histories.select("subject_id", "prediction_time", "horizons").iter_rows()}
    counts = Counts()
    cut_counts: dict = {}
    per_row = {}
    reach: dict[int, int] = {}  # days from the last visit to a row's horizon end -> that horizon
    subsets = sorted(k for k in set(config.sample_counts) if k < config.samples)
    per_row_k: dict[int, dict] = {k: {} for k in subsets}
    bar = tqdm(total=histories.height * config.samples, desc=f"sample {task.name}", unit="trajectory",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with atomic_folder(out, overwrite) as staging:
        writers = {}
        if config.write_trajectories:
            (staging / TRAJECTORIES).mkdir()
        chunks = read_histories(meds_dir, table, task.remove_from_inputs, config.histories_per_chunk)
        no_visit: list = []
        for chunk, tokenized in tokenized_histories(chunks, tokenizer, no_visit):
            add_counts(cut_counts, chunk.counts)
            left_out = chunk.histories.height - len(tokenized)  # histories with no visit: nothing to roll
            if left_out:
                bar.update(left_out * config.samples)
            group = [History(subject, subject_id, prediction_time, list(horizons_of[(subject_id, prediction_time)]))
                     for _, subject_id, prediction_time, subject in tokenized]
            for h in group:
                lead = h.prediction_day - int(h.subject.visit_days[-1])
                for horizon in h.horizons:
                    reach[lead + horizon] = horizon
            rolled = sampler.roll(group, progress=bar)
            for t in rolled:
                counts.add(t)
            for i, h in enumerate(group):
                mine = rolled[i * config.samples:(i + 1) * config.samples]
                for horizon in h.horizons:
                    mc, rb, undecided = risks(mine, horizon)
                    per_row[(h.subject_id, h.prediction_time, horizon)] = (mc, rb, undecided)
                    counts.undecided += undecided
                    for k in subsets:
                        per_row_k[k][(h.subject_id, h.prediction_time, horizon)] = risks(mine[:k], horizon)
            if config.write_trajectories:
                for s, events in trajectory_events(rolled, vocab).items():
                    if s not in writers:
                        writers[s] = pq.ParquetWriter(staging / TRAJECTORIES / f"{s}.parquet", TRAJECTORY_SCHEMA)
                    writers[s].write_table(events.sort_by([("subject_id", "ascending"),
                                                           ("prediction_time", "ascending"), ("time", "ascending")]))
        for s in range(config.samples if config.write_trajectories else 0):
            if s not in writers:  # no event at all for this sample index: an empty file, not a missing one
                writers[s] = pq.ParquetWriter(staging / TRAJECTORIES / f"{s}.parquet", TRAJECTORY_SCHEMA)
            writers[s].close()
        bar.close()
        seconds = time.monotonic() - started
        keys = list(zip(rows["subject_id"], rows["prediction_time"], rows["horizon_days"]))
        summary = {
            "model": Path(run).resolve().name, "task": task.name, "samples": config.samples,
            "histories": histories.height, "label_rows": rows.height, "rows_not_scored": skipped,
            "trajectories": counts.trajectories, "ended": counts.ended, "undecided_row_trajectories": counts.undecided,
            "generated_visits": counts.visits, "generated_tokens": counts.generated_tokens,
            "context_slides": counts.slides, "empty_draws_redrawn": counts.redraws,
            "empty_visits_kept": counts.empty_visits, "visits_truncated_for_the_model": counts.truncated_visits,
            "seconds": round(seconds, 1), "trajectories_per_s": round(counts.trajectories / max(seconds, 1e-9), 2),
            "generated_tokens_per_s": round(counts.generated_tokens / max(seconds, 1e-9), 1),
            "precision": sampler.precision, "events_not_seen": cut_counts,
            **no_visit_rows(rows, table, [h for h, _, _ in no_visit]),
            "config": {"run": str(run), "sample": asdict(config), "window_tokens": sampler.limit,
                       "keep_tokens_on_slide": sampler.keep, "run_config": run_config.to_dict()},
        }
        calibration_file = Path(run) / VISIT_TIME_CALIBRATION
        calibration = json.loads(calibration_file.read_text()) if calibration_file.exists() else None
        # a row whose history has no visit was not rolled: null risks, 0 undecided (counted as rows_without_history)
        unrolled = {(subject_id, prediction_time) for _, subject_id, prediction_time in no_visit}
        for n, results in [(config.samples, per_row)] + [(k, per_row_k[k]) for k in subsets]:
            values = np.asarray([(np.nan, np.nan, 0) if key[:2] in unrolled else results[key] for key in keys],
                                np.float64).reshape(-1, 3)
            for e, estimator in enumerate(ESTIMATORS):
                name = f"{summary['model']}[{estimator}x{n}]"
                frame = prediction_frame(rows.with_columns(pl.Series("undecided", values[:, 2].astype(np.int64)),
                                                           pl.lit(n).alias("samples")),
                                         values[:, e], name, extra_columns=("undecided", "samples"))
                info = {"model": name, "kind": ZERO_SHOT, "estimator": estimator, "label_counts": labels.counts,
                        **{key: summary[key] for key in ("trajectories", "ended", "undecided_row_trajectories",
                                                         "context_slides", "seconds", "precision")},
                        "samples": n, "config": summary["config"],
                        **({"rows_without_history": summary["rows_without_history"]}
                           if "rows_without_history" in summary else {}),
                        **({"visit_time_calibration": calibration} if calibration else {})}
                write_predictions(staging / (estimator if n == config.samples else f"{estimator}_n{n}"), frame, info)
        # the head's bins count from the last visit, which may lie before the prediction day
        beyond = sorted({h for key, h in reach.items() if key > sampler.last_edge})
        if beyond:
            share = counts.ended["no_further_visit"] / max(counts.trajectories, 1)
            summary["warnings"] = [
                f"horizon(s) {', '.join(map(str, beyond))} days reach past the visit-time head's last bin "
                f"({sampler.last_edge} days, counted from the last visit): on average "
                f"{counts.mean_first_open_mass():.1%} of the first gap's probability (given no visit up to the "
                f"prediction day) lies beyond it, and {share:.1%} of the trajectories drew no visit within it; they are "
                "undecided past that day (counted in undecided)"]
            print(f"nextvisit sample: warning: {summary['warnings'][0]}", file=sys.stderr)
        (staging / SAMPLING_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def run_cli(args) -> int:
    config = SampleConfig(samples=args.samples, temperature=args.temperature, seed=args.seed,
                          batch_size=args.batch_size, max_visits=args.max_visits, splits=parse_splits(args.splits),
                          precision=args.precision, write_trajectories=not args.no_trajectories,
                          sample_counts=tuple(args.sample_counts), keep_fraction=args.keep_fraction).validate()
    summary = sample(args.run, args.meds_dir, args.labels, args.out, config, args.device, args.overwrite)
    ended = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in summary["ended"].items())
    print(f"sampled {summary['trajectories']:,} trajectories ({summary['samples']} per history, "
          f"{summary['histories']:,} histories) in {summary['seconds']} s, {summary['trajectories_per_s']} "
          f"trajectories/s; ended: {ended}; {summary['undecided_row_trajectories']:,} (trajectory, row) pairs "
          f"undecided; {summary['context_slides']:,} context slides")
    print(f"wrote {Path(args.out)}/monte_carlo, rao_blackwell (predictions) and {TRAJECTORIES}/ "
          f"({summary['samples']} files)")
    return 0
