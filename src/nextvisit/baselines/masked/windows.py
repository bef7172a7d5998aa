"""Model inputs of the masked encoder: one window of whole visits per row.

Layout of a window of visits ``v_1..v_n``: ``CLS, v_1 tokens, SEP, v_2 tokens, SEP, ..., v_n tokens, SEP``
(token days and types in the package docstring). It is not ``nextvisit.model.sequence``'s layout (there a
SEP carries the *next* visit's day and the window has no CLS), so the arrays are built here; but its sizes
are the shared ones: after the ``CLS`` token, each visit takes its tokens plus one SEP, which is
``sequence.window_cost``. A masked window of ``context`` tokens is therefore a shared window of
``context - 1`` tokens behind one CLS, and the shared ``visit_cap`` / ``_recent_start`` apply with
``max_tokens = visit_budget(context)``.
"""

from __future__ import annotations

import numpy as np
import torch

from nextvisit.baselines.masked.config import MaskedModelConfig
from nextvisit.model.sequence import _recent_start, visit_cap
from nextvisit.tokenize.store import CLS, PAD, SEP, Subject


def visit_budget(context: int) -> int:
    """Tokens left to the visits (with their SEPs) of a window of ``context`` tokens: the CLS takes one."""
    return context - 1


def visit_costs(subject: Subject, context: int) -> np.ndarray:
    """Tokens each visit occupies in a window: its tokens (at most the shared ``visit_cap``) plus its SEP."""
    return np.minimum(np.diff(subject.visit_offsets), visit_cap(visit_budget(context))) + 1


def recent_start(subject: Subject, context: int) -> int:
    """First visit of the longest suffix of the subject's visits that fits a window of ``context`` tokens
    (at least the last visit; the subject has one)."""
    return _recent_start(np.diff(subject.visit_offsets), visit_budget(context))


def random_window(costs: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random run of whole visits that fills up to ``budget`` tokens: from a random first visit forward,
    then backward while room is left. (Pretraining's own draw: ``sequence.split_visits`` cuts a subject
    into deterministic overlapping windows instead.)"""
    n = len(costs)
    start = int(rng.integers(0, n))
    forward = np.cumsum(costs[start:])
    stop = start + max(1, int(np.searchsorted(forward, budget, side="right")))
    room = budget - int(costs[start:stop].sum())
    backward = np.cumsum(costs[:start][::-1])
    start -= int(np.searchsorted(backward, room, side="right"))
    return start, stop


def cls_only() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window of a history without visits: the CLS token alone."""
    return np.array([CLS]), np.zeros(1, np.int64), np.zeros(1, np.int64)


def window_arrays(subject: Subject, start: int, stop: int, config: MaskedModelConfig, cls_day: int | None = None):
    """``tokens, days, types`` (int64 [L]) of ``CLS, v_start, SEP, ..., v_stop-1, SEP``. Days are relative to
    visit ``start``; ``cls_day`` is an absolute day (default: the last visit's)."""
    if stop <= start:  # no visits in the history
        return cls_only()
    offsets = subject.visit_offsets
    lengths = np.minimum(np.diff(offsets[start : stop + 1]), visit_cap(visit_budget(config.context)))
    n, total = stop - start, int(lengths.sum())
    visit_of_token = np.repeat(np.arange(n), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    source = offsets[start:stop][visit_of_token] + within  # index into subject.tokens
    token_pos = 1 + np.arange(total) + visit_of_token  # each earlier visit adds its SEP
    sep_pos = 1 + np.cumsum(lengths) + np.arange(n)
    first_day = int(subject.visit_days[start])
    visit_day = subject.visit_days[start:stop].astype(np.int64) - first_day
    visit_type = np.minimum(np.arange(1, n + 1), config.max_visit_types - 1)
    size = 1 + total + n
    tokens, days, types = np.full(size, CLS, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int64)
    tokens[token_pos] = subject.tokens[source]
    tokens[sep_pos] = SEP
    days[token_pos], days[sep_pos] = visit_day[visit_of_token], visit_day
    types[token_pos], types[sep_pos] = visit_type[visit_of_token], visit_type
    days[0] = (int(subject.visit_days[stop - 1]) if cls_day is None else int(cls_day)) - first_day
    return tokens, days, types


def history_window(subject: Subject | None, prediction_day: int, config: MaskedModelConfig):
    """The most recent visits before the prediction time that fit the context; CLS at the prediction day."""
    if subject is None or subject.n_visits == 0:
        return cls_only()
    start = recent_start(subject, config.context)
    return window_arrays(subject, start, subject.n_visits, config, cls_day=prediction_day)


def collate(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``tokens, days, types`` tensors [B, T]."""
    width = max(len(w[0]) for w in windows)
    out = np.zeros((3, len(windows), width), np.int64)
    out[0].fill(PAD)
    for b, arrays in enumerate(windows):
        for a in range(3):
            out[a, b, : len(arrays[a])] = arrays[a]
    return tuple(torch.from_numpy(x) for x in out)
