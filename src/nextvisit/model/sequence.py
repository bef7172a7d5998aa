"""Model inputs from store subjects: windows, SEP placement, rotary days, attention days, packing, targets.

A window of visits ``v_1..v_n`` becomes ``v_1 tokens, SEP, v_2 tokens, SEP, ..., v_n tokens`` (METHOD §3):

- ``days``: every token of a visit gets the visit's day minus the window's first day; the SEP after ``v_i``
  gets the day of ``v_{i+1}`` (the model is told when the next visit happens).
- ``att_days``: a visit token's is its day; a SEP's is (next visit day - 1), so a SEP never sees the visit it
  predicts. Token a attends b iff same ``doc_ids`` (non-zero) and ``att_days[a] >= att_days[b]``.
- Targets: the SEP after ``v_i`` predicts the supervised tokens (``Vocabulary.supervised_mask``) of
  ``v_{i+1}``. The first visit of a window is input only. ``target_repeats`` counts how often the same token
  was already a positive target earlier in the window (repeat regularization); ``target_seen`` says the token
  occurred anywhere earlier in the window, input visit included (new-onset vs repeat in validation).
- Packing: windows (each at most ``max_window_fraction`` of the context) share a context, each closed by
  ``EOW``, with distinct ``doc_ids`` so no token attends another subject's.

Forecasting uses ``query_batch``: the most recent history plus one query SEP at (last visit day + H) with
attention day (last visit day + H - 1), which therefore sees the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from nextvisit.errors import UserError
from nextvisit.tokenize.store import EOW, PAD, SEP, Subject

# Padded lengths are rounded up to a multiple of this, so kernels see few distinct shapes.
PAD_MULTIPLE = 8


@dataclass
class Batch:
    """Model inputs for B rows of T tokens, and the supervision at SEP positions.

    ``positions`` are flat indices ``b * T + t`` of the SEPs where logits are wanted (training SEPs or query
    SEPs). The targets are sparse: pair k says that row ``target_rows[k]`` of ``positions`` has the positive
    token ``target_tokens[k]``; every other supervised token at that SEP is a negative.
    """

    tokens: torch.Tensor  # int64 [B, T]
    days: torch.Tensor  # float32 [B, T], day offset from the window's first visit (rotary position)
    att_days: torch.Tensor  # int64 [B, T], attention day
    doc_ids: torch.Tensor  # int64 [B, T], packed window index starting at 1; 0 = padding
    positions: torch.Tensor  # int64 [N], flat positions of the SEPs to score
    target_rows: torch.Tensor  # int64 [P], index into positions
    target_tokens: torch.Tensor  # int64 [P]
    target_repeats: torch.Tensor  # int64 [P], earlier positive-target occurrences of the token in the window
    target_seen: torch.Tensor  # bool [P], the token occurred earlier in the window (input visit included)
    sep_window: torch.Tensor  # int64 [N], which window (in the order given) each position belongs to
    sep_visit: torch.Tensor  # int64 [N], index in the subject of the visit the SEP predicts (queries: n_visits)

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.doc_ids > 0).sum())

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


@dataclass
class Window:
    """Visits ``start..stop-1`` of one subject (of a split, by index, or of a list given to a builder)."""

    subject: int
    start: int
    stop: int


def window_cost(visit_lengths: np.ndarray) -> int:
    """Tokens a window of these visits occupies: its tokens, one SEP between visits, one closing token
    (EOW when packed, the query SEP when forecasting). ``cost = sum(lengths) + n_visits``."""
    return int(np.sum(visit_lengths)) + len(visit_lengths)


def split_visits(visit_lengths: np.ndarray, max_tokens: int, first_stop: int | None = None) -> list[tuple[int, int]]:
    """Cut a subject's visits into windows ``(start, stop)`` of at most ``max_tokens`` (see ``window_cost``).

    Consecutive windows overlap by one visit, so every visit after the subject's first is a target exactly
    once. Visits longer than a window are truncated by the builder (see ``visit_cap``). ``first_stop`` ends
    the first window early (a random shift between epochs so window boundaries vary).

    >>> split_visits(np.array([3, 3, 3, 3]), max_tokens=8)
    [(0, 2), (1, 3), (2, 4)]
    >>> split_visits(np.array([3, 3]), max_tokens=100)
    [(0, 2)]
    """
    n = len(visit_lengths)
    cap = visit_cap(max_tokens)
    costs = np.minimum(np.asarray(visit_lengths), cap) + 1
    windows = []
    start = 0
    while start < n - 1 or not windows:
        stop = start + 1
        total = costs[start]
        limit = first_stop if (first_stop is not None and not windows) else n
        while stop < min(n, limit) and total + costs[stop] <= max_tokens:
            total += costs[stop]
            stop += 1
        windows.append((start, stop))
        if stop >= n:
            break
        start = stop - 1
    return windows


def visit_cap(max_tokens: int) -> int:
    """Most tokens kept of one visit, so that any two consecutive visits fit in a window."""
    return max(1, max_tokens // 2 - 1)


def _window_arrays(subject: Subject, start: int, stop: int, max_tokens: int, supervised: np.ndarray | None,
                   query_day: int | None = None, close_with_eow: bool = False) -> dict:
    """Token-level arrays of one window (see module docstring). ``query_day`` (relative to the window's first
    visit) appends a query SEP; ``close_with_eow`` appends EOW."""
    offsets = subject.visit_offsets
    lengths = np.minimum(np.diff(offsets[start : stop + 1]), visit_cap(max_tokens)).astype(np.int64)
    n = stop - start
    visit_days = subject.visit_days[start:stop].astype(np.int64)
    rel_days = visit_days - visit_days[0]
    visit_of_token = np.repeat(np.arange(n), lengths)
    first_of_visit = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    source = offsets[start:stop][visit_of_token] + (np.arange(len(visit_of_token)) - first_of_visit[visit_of_token])
    visit_tokens = subject.tokens[source].astype(np.int64)

    n_seps = n - 1
    extra = int(query_day is not None) + int(close_with_eow)
    length = len(visit_tokens) + n_seps + extra
    tokens = np.empty(length, np.int64)
    days = np.empty(length, np.int64)
    att_days = np.empty(length, np.int64)
    # visit tokens are shifted right by the number of SEPs before them
    token_pos = np.arange(len(visit_tokens)) + visit_of_token
    tokens[token_pos] = visit_tokens
    days[token_pos] = rel_days[visit_of_token]
    att_days[token_pos] = rel_days[visit_of_token]
    sep_pos = np.cumsum(lengths)[:-1] + np.arange(n_seps)
    tokens[sep_pos] = SEP
    days[sep_pos] = rel_days[1:]
    att_days[sep_pos] = rel_days[1:] - 1
    end = len(visit_tokens) + n_seps
    out = {"tokens": tokens, "days": days, "att_days": att_days, "sep_pos": sep_pos,
           "sep_visit": np.arange(start + 1, stop, dtype=np.int64), "truncated": int(np.sum(np.diff(offsets[start:stop + 1]) > lengths))}
    if query_day is not None:
        tokens[end], days[end], att_days[end] = SEP, query_day, query_day - 1
        out["query_pos"] = end
        end += 1
    if close_with_eow:
        tokens[end], days[end], att_days[end] = EOW, rel_days[-1], rel_days[-1]

    if supervised is not None:
        is_supervised = supervised[visit_tokens]
        sup_tokens = visit_tokens[is_supervised]
        sup_visit = visit_of_token[is_supervised]
        # occurrences of the same token ordered by visit: rank among all = seen before (input included),
        # rank among target visits (>= 1) = earlier positive targets
        order = np.lexsort((sup_visit, sup_tokens))
        rank_all = _rank_in_groups(sup_tokens[order])
        seen = np.empty(len(order), bool)
        seen[order] = rank_all > 0
        is_target = sup_visit >= 1
        target_tokens = sup_tokens[is_target]
        target_visit = sup_visit[is_target]
        order_t = np.lexsort((target_visit, target_tokens))
        repeats = np.empty(len(order_t), np.int64)
        repeats[order_t] = _rank_in_groups(target_tokens[order_t])
        out.update(target_rows=target_visit - 1, target_tokens=target_tokens, target_repeats=repeats,
                   target_seen=seen[is_target])
    return out


def _rank_in_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal keys. ``[4, 4, 7, 9, 9, 9] -> [0, 1, 0, 0, 1, 2]``"""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    group_start = np.repeat(starts, np.diff(np.concatenate([starts, [len(sorted_keys)]])))
    return np.arange(len(sorted_keys)) - group_start


def collate(rows: list[list[dict]], with_targets: bool, pad_multiple: int = PAD_MULTIPLE) -> Batch:
    """One ``Batch`` from rows of window arrays (each row holds one or more packed windows)."""
    lengths = [sum(len(w["tokens"]) for w in row) for row in rows]
    width = max(1, -(-max(lengths) // pad_multiple) * pad_multiple)
    B = len(rows)
    tokens = np.full((B, width), PAD, np.int64)
    days = np.zeros((B, width), np.int64)
    att_days = np.zeros((B, width), np.int64)
    doc_ids = np.zeros((B, width), np.int64)
    positions, sep_window, sep_visit = [], [], []
    t_rows, t_tokens, t_repeats, t_seen = [], [], [], []
    n_positions = 0
    window_index = 0
    for b, row in enumerate(rows):
        cursor = 0
        for doc, w in enumerate(row, start=1):
            k = len(w["tokens"])
            tokens[b, cursor : cursor + k] = w["tokens"]
            days[b, cursor : cursor + k] = w["days"]
            att_days[b, cursor : cursor + k] = w["att_days"]
            doc_ids[b, cursor : cursor + k] = doc
            flat = b * width + cursor
            if "query_pos" in w:
                sep = np.array([w["query_pos"]])
                visits = np.array([w["n_visits"]])
            else:
                sep, visits = w["sep_pos"], w["sep_visit"]
            positions.append(flat + sep)
            sep_window.append(np.full(len(sep), window_index))
            sep_visit.append(visits)
            if with_targets:
                t_rows.append(w["target_rows"] + n_positions)
                t_tokens.append(w["target_tokens"])
                t_repeats.append(w["target_repeats"])
                t_seen.append(w["target_seen"])
            n_positions += len(sep)
            cursor += k
            window_index += 1

    def cat(parts, dtype):
        return torch.from_numpy(np.concatenate(parts).astype(dtype)) if parts else torch.zeros(0, dtype=torch.int64)

    return Batch(
        tokens=torch.from_numpy(tokens),
        days=torch.from_numpy(days.astype(np.float32)),
        att_days=torch.from_numpy(att_days),
        doc_ids=torch.from_numpy(doc_ids),
        positions=cat(positions, np.int64),
        target_rows=cat(t_rows, np.int64),
        target_tokens=cat(t_tokens, np.int64),
        target_repeats=cat(t_repeats, np.int64),
        target_seen=cat(t_seen, bool) if with_targets else torch.zeros(0, dtype=torch.bool),
        sep_window=cat(sep_window, np.int64),
        sep_visit=cat(sep_visit, np.int64),
    )


# -- forecasting ----------------------------------------------------------------------------------------------

def query_batch(subjects: Sequence[Subject], horizon_days, max_tokens: int = 511) -> Batch:
    """One row per subject: its most recent visits (at most ``max_tokens`` tokens with the SEPs between
    them, starting at a visit boundary), then one query SEP at (last visit day + H) with attention day
    (last visit day + H - 1), so the query sees the whole history and nothing after it.

    ``horizon_days``: one int for all subjects or one per subject. Logits:
    ``model.query_logits(batch, batch.positions) -> [len(subjects), V]`` (row i = subject i).
    To average several horizons for one subject, repeat the subject once per horizon.
    """
    horizons = np.broadcast_to(np.asarray(horizon_days, dtype=np.int64), (len(subjects),))
    if np.any(horizons < 1):
        raise UserError(f"horizon must be at least 1 day, got {int(horizons.min())}")
    rows = []
    for subject, horizon in zip(subjects, horizons):
        if subject.n_visits == 0:
            raise UserError(f"subject {subject.subject_id}: no visits in the history; nothing to forecast from")
        start = _recent_start(np.diff(subject.visit_offsets), max_tokens + 1)
        arrays = _window_arrays(subject, start, subject.n_visits, max_tokens + 1, supervised=None,
                                query_day=int(subject.visit_days[-1] - subject.visit_days[start]) + int(horizon))
        arrays["n_visits"] = subject.n_visits
        rows.append([arrays])
    return collate(rows, with_targets=False)


def _recent_start(visit_lengths: np.ndarray, max_tokens: int) -> int:
    """First visit of the longest suffix of visits whose window (plus the closing query SEP) fits."""
    costs = np.minimum(visit_lengths, visit_cap(max_tokens)) + 1
    suffix = np.cumsum(costs[::-1])[::-1]  # cost of visits i..n-1
    fits = np.flatnonzero(suffix <= max_tokens)
    return int(fits[0]) if len(fits) else len(visit_lengths) - 1


# -- every visit boundary of whole subjects (occurrence scoring, validation) -----------------------------------

def subject_windows(subjects: Sequence[Subject], max_tokens: int) -> list[Window]:
    """Deterministic windows covering every visit boundary of each subject once (overlap of one visit)."""
    windows = []
    for i, subject in enumerate(subjects):
        if subject.n_visits < 2:
            continue
        for start, stop in split_visits(np.diff(subject.visit_offsets), max_tokens):
            windows.append(Window(i, start, stop))
    return windows


def windows_batch(subjects: Sequence[Subject], windows: Sequence[Window], supervised: np.ndarray,
                  max_tokens: int, packed_rows: Sequence[Sequence[int]] | None = None,
                  pad_multiple: int = PAD_MULTIPLE) -> Batch:
    """Batch of training-style windows with targets at every SEP. ``packed_rows`` groups window indices
    into rows (packing, EOW after each window); by default one window per row, no EOW.
    ``batch.sep_window`` indexes ``windows``; ``batch.sep_visit`` is the predicted visit's index in its subject.
    """
    packed = packed_rows is not None
    groups = packed_rows if packed else [[i] for i in range(len(windows))]
    rows = []
    for group in groups:
        row = []
        for i in group:
            w = windows[i]
            row.append(_window_arrays(subjects[w.subject], w.start, w.stop, max_tokens, supervised,
                                      close_with_eow=packed))
        rows.append(row)
    batch = collate(rows, with_targets=True, pad_multiple=pad_multiple)
    if packed:
        # collate numbered windows in row order; map back to the caller's window indices
        order = torch.tensor([i for group in groups for i in group], dtype=torch.int64)
        batch.sep_window = order[batch.sep_window]
    return batch


# -- training plan: windows of a split, shuffled and packed ----------------------------------------------------

def pack_windows(costs: np.ndarray, context: int, open_bins: int = 16) -> list[list[int]]:
    """Greedy first-fit of windows (in the given order) into contexts of ``context`` tokens, keeping at
    most ``open_bins`` partly filled contexts. Returns window indices per context.

    >>> pack_windows(np.array([5, 5, 3, 8, 2]), context=10)
    [[0, 1], [2, 4], [3]]
    """
    bins: list[list[int]] = []
    room: list[int] = []
    open_ids: list[int] = []
    for i, cost in enumerate(costs):
        cost = int(cost)
        target = next((b for b in open_ids if room[b] >= cost), None)
        if target is None:
            bins.append([])
            room.append(context)
            target = len(bins) - 1
            open_ids.append(target)
            if len(open_ids) > open_bins:
                open_ids.pop(0)
        bins[target].append(i)
        room[target] -= cost
        if room[target] < 2:
            open_ids.remove(target)
    return bins


class TrainingPlan:
    """The deterministic order of training contexts for one epoch of a split.

    Epoch ``e`` is a function of (seed, e) only: each subject's visits are cut into windows (``split_visits``
    with a random first cut), the windows shuffled, then packed. So (epoch, index) is a complete data position
    for resuming, and every process of a distributed run computes the same plan.
    """

    def __init__(self, split, supervised: np.ndarray, context: int, pack: bool, max_window_fraction: float,
                 seed: int, pad_multiple: int = PAD_MULTIPLE):
        self.split = split
        self.pad_multiple = pad_multiple  # the context itself for FlexAttention, which compiles per shape
        self.supervised = supervised
        self.context = context
        self.pack = pack
        self.max_window = int(context * max_window_fraction) if pack else context
        self.seed = seed
        subject_visits = np.asarray(split.subject_visits)
        visit_tokens = np.asarray(split.visit_tokens)
        self._visit_lengths = np.diff(visit_tokens)
        self._subject_visits = subject_visits
        self.n_subjects = len(split)
        self.skipped_single_visit = int(np.sum(np.diff(subject_visits) < 2))
        # visits longer than half a window keep their first visit_cap tokens (reported by the trainer)
        cap = visit_cap(self.max_window)
        self.truncated_visits = int(np.sum(self._visit_lengths > cap))
        self.truncated_tokens = int(np.sum(np.maximum(self._visit_lengths - cap, 0)))
        self._epochs: dict[int, tuple[list[Window], list[list[int]]]] = {}

    def epoch(self, epoch: int) -> tuple[list[Window], list[list[int]]]:
        """(windows, contexts as lists of window indices) of one epoch."""
        if epoch not in self._epochs:
            self._epochs = {epoch: self._build(epoch)}  # keep one epoch in memory
        return self._epochs[epoch]

    def _build(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        windows: list[Window] = []
        costs: list[int] = []
        cap = visit_cap(self.max_window)
        for i in range(self.n_subjects):
            v0, v1 = int(self._subject_visits[i]), int(self._subject_visits[i + 1])
            if v1 - v0 < 2:
                continue
            lengths = self._visit_lengths[v0:v1]
            clipped = np.minimum(lengths, cap) + 1
            if clipped.sum() <= self.max_window:
                pieces = [(0, v1 - v0)]
            else:
                pieces = split_visits(lengths, self.max_window, first_stop=int(rng.integers(2, v1 - v0 + 1)))
            for start, stop in pieces:
                if stop - start >= 2:
                    windows.append(Window(i, start, stop))
                    costs.append(int(clipped[start:stop].sum()))
        order = rng.permutation(len(windows))
        windows = [windows[j] for j in order]
        costs = np.asarray(costs, np.int64)[order] if len(costs) else np.zeros(0, np.int64)
        if self.pack:
            contexts = pack_windows(costs, self.context)
        else:
            contexts = [[j] for j in range(len(windows))]
        return windows, contexts

    def n_contexts(self, epoch: int = 0) -> int:
        return len(self.epoch(epoch)[1])

    def batch(self, epoch: int, context_indices: Sequence[int]) -> Batch:
        windows, contexts = self.epoch(epoch)
        chosen = [contexts[c] for c in context_indices]
        subjects = {}
        for group in chosen:
            for j in group:
                s = windows[j].subject
                if s not in subjects:
                    subjects[s] = self.split.subject(s)
        local = [Window(windows[j].subject, windows[j].start, windows[j].stop) for group in chosen for j in group]
        subject_list = list(subjects)
        position = {s: k for k, s in enumerate(subject_list)}
        local = [Window(position[w.subject], w.start, w.stop) for w in local]
        rows, k = [], 0
        for group in chosen:
            rows.append(list(range(k, k + len(group))))
            k += len(group)
        return windows_batch([subjects[s] for s in subject_list], local, self.supervised, self.max_window,
                             packed_rows=rows if self.pack else None, pad_multiple=self.pad_multiple)
