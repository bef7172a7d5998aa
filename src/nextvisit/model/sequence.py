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

Horizon queries (``model.horizon_queries``, docs/model.md "Horizon queries"): training asks the incidence
question itself. A visit ``v_i`` may carry query tokens (the SEP token, flagged in ``is_query``; the model adds a
learned query embedding) placed after it, at rotary day ``day(v_i) + gap`` (gaps drawn up to years ahead) with
attention day ``day(v_i)``: its own visit. Its targets are the union of the supervised tokens of every visit in
``(day(v_i), day(v_i) + gap]`` (the subject's later visits, inside the window or not), so its logits answer "does the
code occur within ``gap`` days". The rotary day and the attention day of a query differ: a query attends a token b
iff same document, b is not a query, and ``days[b] <= att_days[query]`` (b sits at or before the query's own visit;
this leaves out the SEP after ``v_i``, whose rotary day is the next visit's), so it sees the history up to its own
visit and none of the visits it skips. No other token attends a query (``transformer.attention_allowed``).

History summary (``data.history_summary_tokens``, docs/model.md "History summary"): a window that starts after
the subject's first visit is preceded by the first occurrence of each code and demographic token of the visits
before it (the demographics, which the tokenizer writes at the first visit only, always; then the most recent
first occurrences, up to the cap), each at the day of that first occurrence (days before the window's first visit
are negative) with that day as its attention day; input only.

Forecasting uses ``query_batch``: the most recent history plus one query at (last visit day + H): a query SEP with
attention day (last visit day + H - 1), or, for a run trained with horizon queries, a horizon query (attention day the
last visit's); either sees the whole history and nothing after it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from nextvisit.errors import UserError
from nextvisit.tokenize.store import EOW, PAD, SEP, Subject, Vocabulary, concatenated_ranges, read_block, split_blocks

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
    sep_visit: torch.Tensor  # int64 [N], index in the subject of the visit the SEP predicts (queries: n_visits;
    # horizon queries of training: the index of their own visit)
    is_query: torch.Tensor  # bool [B, T], horizon-query tokens (attention rule and query embedding)
    # visit-time targets (model.visit_time_head): flat positions of the last token of each visit followed by a SEP
    # in its window, and the gap in days from that visit to the next
    time_positions: torch.Tensor  # int64 [M]
    time_gaps: torch.Tensor  # int64 [M]
    # recurrence bucket of each token (``recurrence_buckets``): 0 for SEPs, queries, EOW, padding and history-summary
    # tokens; else 1 + the bit length of the number of the subject's earlier visits (whole record) holding the token.
    # Built only on request (``recurrence=True``, a model with ``recurrence_embedding``); otherwise [B, 0]
    recurrence: torch.Tensor  # int64 [B, T] or [B, 0]

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.doc_ids > 0).sum())

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


# Recurrence buckets (``model.recurrence_embedding``): 0 = no count (specials, summary tokens); a visit token whose
# code was held by c earlier visits of the subject gets 1 + bit_length(c) (c = 0, 1, 2-3, 4-7, ...), capped.
RECURRENCE_BUCKETS = 11


def prior_visit_counts(subject: Subject, end_visit: int | None = None) -> np.ndarray:
    """For each token of visits ``0..end_visit-1`` (default all), how many earlier visits of the subject hold the
    same token (a token repeated inside one visit counts that visit once)."""
    offsets = subject.visit_offsets
    n_visits = subject.n_visits if end_visit is None else end_visit
    end = int(offsets[n_visits])
    tokens = subject.tokens[:end].astype(np.int64)
    if end == 0:
        return np.zeros(0, np.int64)
    visit = np.repeat(np.arange(n_visits), np.diff(offsets[: n_visits + 1]))
    order = np.lexsort((visit, tokens))
    t, v = tokens[order], visit[order]
    new_token = np.concatenate([[True], t[1:] != t[:-1]])
    new_pair = new_token | np.concatenate([[True], v[1:] != v[:-1]])
    pair_index = np.cumsum(new_pair) - 1  # distinct (token, visit) pairs in sorted order
    token_start = np.flatnonzero(new_token)
    first_pair = np.repeat(pair_index[token_start], np.diff(np.concatenate([token_start, [end]])))
    out = np.empty(end, np.int64)
    out[order] = pair_index - first_pair
    return out


def recurrence_buckets(counts: np.ndarray) -> np.ndarray:
    """Bucket ids (``RECURRENCE_BUCKETS``) of earlier-visit counts."""
    exponent = np.frexp(np.asarray(counts, np.float64))[1]  # bit length for non-negative integers
    return 1 + np.minimum(exponent, RECURRENCE_BUCKETS - 2).astype(np.int64)


@dataclass
class HistorySummary:
    """The history summary ahead of a window that starts after the subject's first visit (module docstring)."""

    max_tokens: int
    summarized: np.ndarray  # bool [V]: code and demographic tokens
    always: np.ndarray  # bool [V]: demographic tokens, kept whatever the cap

    @classmethod
    def of(cls, vocab: Vocabulary, max_tokens: int) -> "HistorySummary | None":
        """The summary of a run with ``data.history_summary_tokens = max_tokens`` (None when 0)."""
        if max_tokens <= 0:
            return None
        kinds = np.asarray(vocab.kinds)
        return cls(int(max_tokens), np.isin(kinds, ("code", "demographic")), kinds == "demographic")

    def tokens_before(self, subject: Subject, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, days) of the summary of visits ``0..start-1``, ordered by day then token id."""
        end = int(subject.visit_offsets[start])
        if start <= 0 or end == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tokens = subject.tokens[:end].astype(np.int64)
        keep = self.summarized[tokens]
        tokens, where = tokens[keep], np.flatnonzero(keep)
        unique, first = np.unique(tokens, return_index=True)  # first index of each token (tokens sorted by time)
        visit = np.searchsorted(subject.visit_offsets, where[first], side="right") - 1
        days = subject.visit_days[visit].astype(np.int64)
        order = np.lexsort((unique, days))
        unique, days = unique[order], days[order]
        if len(unique) > self.max_tokens:
            always = self.always[unique]
            room = max(0, self.max_tokens - int(always.sum()))
            others = np.flatnonzero(~always)
            chosen = np.zeros(len(unique), bool)
            chosen[always] = True
            chosen[others[len(others) - room:] if room else []] = True  # the most recent first occurrences
            unique, days = unique[chosen], days[chosen]
        return unique, days


@dataclass
class Window:
    """Visits ``start..stop-1`` of one subject (of a split, by index, or of a list given to a builder).
    ``queries``: horizon queries as (visit index within the window, gap in days) arrays, or None."""

    subject: int
    start: int
    stop: int
    queries: tuple[np.ndarray, np.ndarray] | None = None


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
                   query_day: int | None = None, close_with_eow: bool = False, horizon_query: bool = False,
                   queries: tuple[np.ndarray, np.ndarray] | None = None,
                   summary: HistorySummary | None = None, recurrence: bool = False) -> dict:
    """The window's arrays (``_visit_arrays``), preceded by the history summary of the visits before ``start``;
    with ``recurrence`` also the tokens' recurrence buckets (``Batch.recurrence``)."""
    out = _visit_arrays(subject, start, stop, max_tokens, supervised, query_day, close_with_eow, horizon_query, queries)
    if recurrence:
        buckets = np.zeros(len(out["tokens"]), np.int64)
        buckets[out["token_pos"]] = recurrence_buckets(prior_visit_counts(subject, stop)[out["token_source"]])
        out["recurrence"] = buckets
    if summary is None or start == 0:
        return out
    tokens, days = summary.tokens_before(subject, start)
    if len(tokens) == 0:
        return out
    days = days - int(subject.visit_days[start])
    k = len(tokens)
    out["tokens"] = np.concatenate([tokens, out["tokens"]])
    out["days"] = np.concatenate([days, out["days"]])
    out["att_days"] = np.concatenate([days, out["att_days"]])
    out["is_query"] = np.concatenate([np.zeros(k, bool), out["is_query"]])
    if recurrence:
        out["recurrence"] = np.concatenate([np.zeros(k, np.int64), out["recurrence"]])
    for key in ("sep_pos", "hq_pos", "query_pos", "time_pos"):
        if key in out:
            out[key] = out[key] + k
    return out


def _visit_arrays(subject: Subject, start: int, stop: int, max_tokens: int, supervised: np.ndarray | None,
                  query_day: int | None, close_with_eow: bool, horizon_query: bool,
                  queries: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Token-level arrays of one window (see module docstring). ``query_day`` (relative to the window's first
    visit) appends a query (a horizon query with ``horizon_query``, else a query SEP); ``close_with_eow`` appends
    EOW; ``queries`` (visit index within the window, gap days) places training horizon queries after their visits.
    Layout per visit j: its tokens, the SEP after it (all but the last), its horizon queries (if any, in the given
    order)."""
    offsets = subject.visit_offsets
    lengths = np.minimum(np.diff(offsets[start : stop + 1]), visit_cap(max_tokens)).astype(np.int64)
    n = stop - start
    visit_days = subject.visit_days[start:stop].astype(np.int64)
    rel_days = visit_days - visit_days[0]
    visit_of_token = np.repeat(np.arange(n), lengths)
    first_of_visit = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    source = offsets[start:stop][visit_of_token] + (np.arange(len(visit_of_token)) - first_of_visit[visit_of_token])
    visit_tokens = subject.tokens[source].astype(np.int64)

    q_visit = np.zeros(0, np.int64) if queries is None else np.asarray(queries[0], np.int64)
    q_gap = np.zeros(0, np.int64) if queries is None else np.asarray(queries[1], np.int64)
    order = np.argsort(q_visit, kind="stable")
    q_visit, q_gap = q_visit[order], q_gap[order]
    queries_of_visit = np.bincount(q_visit, minlength=n)
    sep_after = np.ones(n, np.int64)
    sep_after[-1] = 0
    slots = lengths + sep_after + queries_of_visit
    slot_start = np.concatenate([[0], np.cumsum(slots)[:-1]])
    n_seps = n - 1
    extra = int(query_day is not None) + int(close_with_eow)
    end = int(slots.sum())
    length = end + extra
    tokens = np.empty(length, np.int64)
    days = np.empty(length, np.int64)
    att_days = np.empty(length, np.int64)
    is_query = np.zeros(length, bool)
    token_pos = slot_start[visit_of_token] + (np.arange(len(visit_tokens)) - first_of_visit[visit_of_token])
    tokens[token_pos] = visit_tokens
    days[token_pos] = rel_days[visit_of_token]
    att_days[token_pos] = rel_days[visit_of_token]
    sep_pos = slot_start[:-1] + lengths[:-1]
    tokens[sep_pos] = SEP
    days[sep_pos] = rel_days[1:]
    att_days[sep_pos] = rel_days[1:] - 1
    hq_pos = slot_start[q_visit] + lengths[q_visit] + sep_after[q_visit] + _rank_in_groups(q_visit)
    tokens[hq_pos] = SEP
    days[hq_pos] = rel_days[q_visit] + q_gap
    att_days[hq_pos] = rel_days[q_visit]
    is_query[hq_pos] = True
    out = {"tokens": tokens, "days": days, "att_days": att_days, "is_query": is_query, "sep_pos": sep_pos,
           "token_pos": token_pos, "token_source": source,
           "sep_visit": np.arange(start + 1, stop, dtype=np.int64), "hq_pos": hq_pos,
           "hq_visit": start + q_visit, "truncated": int(np.sum(np.diff(offsets[start:stop + 1]) > lengths)),
           # the visit-time head reads the last token of each visit that has a SEP after it (it sees that visit
           # and the history, not the SEP, which carries the next visit's day), target: the gap to that visit
           "time_pos": sep_pos - 1, "time_gap": np.diff(rel_days)}
    if query_day is not None:
        tokens[end], days[end] = SEP, query_day
        att_days[end] = rel_days[-1] if horizon_query else query_day - 1
        is_query[end] = horizon_query
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
        rows, seen_t = target_visit - 1, seen[is_target]
        if len(q_visit):
            q_rows, q_tokens, q_repeats, q_seen = _query_targets(subject, start, q_visit, q_gap, supervised,
                                                                 sup_tokens, sup_visit)
            rows = np.concatenate([rows, n_seps + q_rows])
            target_tokens = np.concatenate([target_tokens, q_tokens])
            repeats = np.concatenate([repeats, q_repeats])
            seen_t = np.concatenate([seen_t, q_seen])
        out.update(target_rows=rows, target_tokens=target_tokens, target_repeats=repeats, target_seen=seen_t)
    return out


def _query_targets(subject: Subject, start: int, q_visit: np.ndarray, q_gap: np.ndarray, supervised: np.ndarray,
                   sup_tokens: np.ndarray, sup_visit: np.ndarray):
    """Targets of the horizon queries after window visits ``q_visit`` with gaps ``q_gap``: (query row, token,
    repeats, seen) for every supervised token of any visit of the subject in ``(day, day + gap]``. ``repeats``
    counts the window's target visits (1..j) that held the token, ``seen`` whether any visit 0..j did, as for the
    SEPs (``sup_tokens``/``sup_visit``: the window's supervised input tokens and their visit within the window)."""
    own = start + q_visit
    last = np.searchsorted(subject.visit_days, subject.visit_days[own].astype(np.int64) + q_gap, side="right")
    lo, hi = subject.visit_offsets[own + 1], subject.visit_offsets[last]
    sizes = np.maximum(hi - lo, 0)
    query_of = np.repeat(np.arange(len(own)), sizes)
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    tokens = subject.tokens[np.repeat(lo, sizes) + within].astype(np.int64)
    keep = supervised[tokens]
    V = len(supervised)
    pairs = np.sort(query_of[keep] * V + tokens[keep])
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs  # unique, sorted
    rows, targets = pairs // V, pairs % V
    n = int(max(q_visit.max(), sup_visit.max() if len(sup_visit) else 0)) + 1
    keys = np.sort(sup_tokens * n + sup_visit)  # occurrences by (token, visit within the window)
    first = np.searchsorted(keys, targets * n, side="left")
    seen_count = np.searchsorted(keys, targets * n + q_visit[rows], side="right") - first  # in visits 0..j
    in_first_visit = np.searchsorted(keys, targets * n, side="right") - first  # in visit 0 (input only)
    repeats = seen_count - in_first_visit
    return rows.astype(np.int64), targets, repeats.astype(np.int64), seen_count > 0


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
    is_query = np.zeros((B, width), bool)
    with_recurrence = all("recurrence" in w for row in rows for w in row)
    recurrence = np.zeros((B, width if with_recurrence else 0), np.int64)
    positions, sep_window, sep_visit = [], [], []
    t_rows, t_tokens, t_repeats, t_seen = [], [], [], []
    time_positions, time_gaps = [], []
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
            is_query[b, cursor : cursor + k] = w["is_query"]
            if with_recurrence:
                recurrence[b, cursor : cursor + k] = w["recurrence"]
            flat = b * width + cursor
            if "query_pos" in w:
                sep = np.array([w["query_pos"]])
                visits = np.array([w["n_visits"]])
            else:  # the SEPs, then the horizon queries (the targets' rows count in this order)
                sep = np.concatenate([w["sep_pos"], w["hq_pos"]])
                visits = np.concatenate([w["sep_visit"], w["hq_visit"]])
            positions.append(flat + sep)
            if "query_pos" not in w:
                time_positions.append(flat + w["time_pos"])
                time_gaps.append(w["time_gap"])
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
        is_query=torch.from_numpy(is_query),
        time_positions=cat(time_positions, np.int64),
        time_gaps=cat(time_gaps, np.int64),
        recurrence=torch.from_numpy(recurrence),
    )


# -- forecasting ----------------------------------------------------------------------------------------------

def query_batch(subjects: Sequence[Subject], horizon_days, max_tokens: int = 511, horizon_query: bool = False,
                summary: HistorySummary | None = None, recurrence: bool = False) -> Batch:
    """One row per subject: its most recent visits (at most ``max_tokens`` tokens with the SEPs between
    them, starting at a visit boundary), then one query SEP at (last visit day + H) with attention day
    (last visit day + H - 1), so the query sees the whole history and nothing after it. With
    ``horizon_query`` (a run trained with horizon queries) the query is a horizon query: the same token and
    rotary day, flagged in ``is_query``, attention day the last visit's (the same history in view). With
    ``summary``, the history summary of the visits before the recent ones comes first (not counted in
    ``max_tokens``, as in training windows). ``recurrence``: build the tokens' recurrence buckets (a model with
    ``recurrence_embedding``).

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
                                query_day=int(subject.visit_days[-1] - subject.visit_days[start]) + int(horizon),
                                horizon_query=horizon_query, summary=summary, recurrence=recurrence)
        arrays["n_visits"] = subject.n_visits
        rows.append([arrays])
    return collate(rows, with_targets=False)


def window_arrays(subject: Subject, start: int, max_tokens: int, summary: HistorySummary | None = None,
                  query_day: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, rotary days, attention days) of visits ``start..`` of ``subject`` as one document, read the way a
    forecast reads a history (visits capped at ``visit_cap(max_tokens)`` tokens, the history summary ahead), days
    relative to visit ``start``; with ``query_day`` closed by a query SEP there (attention day one before). The
    sampler (``nextvisit.predict.sample``) encodes trajectories with it."""
    arrays = _window_arrays(subject, start, subject.n_visits, max_tokens, supervised=None, query_day=query_day,
                            summary=summary)
    return arrays["tokens"], arrays["days"], arrays["att_days"]


def recent_start(visit_lengths: np.ndarray, budget: int, max_tokens: int) -> int:
    """First visit of the longest suffix of visits that fits in ``budget`` tokens, visits capped as in a window
    of ``max_tokens`` (one SEP per visit counted; at least the last visit)."""
    return _recent_start(visit_lengths, budget, cap=visit_cap(max_tokens))


def _recent_start(visit_lengths: np.ndarray, max_tokens: int, cap: int | None = None) -> int:
    """First visit of the longest suffix of visits whose window (plus the closing query SEP) fits."""
    costs = np.minimum(visit_lengths, visit_cap(max_tokens) if cap is None else cap) + 1
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
                  pad_multiple: int = PAD_MULTIPLE, summary: HistorySummary | None = None,
                  recurrence: bool = False) -> Batch:
    """Batch of training-style windows with targets at every SEP. ``packed_rows`` groups window indices
    into rows (packing, EOW after each window); by default one window per row, no EOW. ``recurrence``: build the
    tokens' recurrence buckets.
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
                                      close_with_eow=packed, queries=w.queries, summary=summary,
                                      recurrence=recurrence))
        rows.append(row)
    batch = collate(rows, with_targets=True, pad_multiple=pad_multiple)
    if packed:
        # collate numbered windows in row order; map back to the caller's window indices
        order = torch.tensor([i for group in groups for i in group], dtype=torch.int64)
        batch.sep_window = order[batch.sep_window]
    return batch


# -- training plan: windows of a split, shuffled and packed ----------------------------------------------------

def pack_windows(costs: np.ndarray, context: int, open_bins: int = 16) -> np.ndarray:
    """Greedy first-fit of windows (in the given order) into contexts of ``context`` tokens, keeping at
    most ``open_bins`` partly filled contexts. Returns the context of each window (int64; contexts numbered in
    the order they open, each holding its windows in the given order).

    >>> pack_windows(np.array([5, 5, 3, 8, 2]), context=10).tolist()  # contexts [0, 1], [2, 4], [3]
    [0, 0, 1, 2, 1]
    """
    context_of = np.empty(len(costs), np.int64)
    open_ids: list[int] = []  # the open contexts, oldest first, and the room left in each
    open_room: list[int] = []
    n_contexts = 0
    for begin in range(0, len(costs), _PACK_CHUNK):
        for i, cost in enumerate(np.asarray(costs[begin : begin + _PACK_CHUNK]).tolist(), start=begin):
            k = next((k for k, room in enumerate(open_room) if room >= cost), None)
            if k is None:
                open_ids.append(n_contexts)
                open_room.append(context)
                n_contexts += 1
                if len(open_ids) > open_bins:
                    del open_ids[0], open_room[0]
                k = len(open_ids) - 1
            context_of[i] = open_ids[k]
            open_room[k] -= cost
            if open_room[k] < 2:
                del open_ids[k], open_room[k]
    return context_of


# windows whose costs pack_windows turns into Python ints at a time (a bounded list, whatever the epoch's size),
# and visits whose horizon-query draws are made at a time
_PACK_CHUNK = 1 << 16
_DRAW_CHUNK = 1 << 16


@dataclass
class HorizonQuerySampling:
    """Where training places horizon queries (module docstring; docs/model.md "Horizon queries").

    Each visit gets a query with probability ``rate``, at a gap drawn uniformly from 1..``max_days`` days; with
    ``per_visit`` k > 1, k such draws, each with its own gap (the first is the draw of a run with k = 1). A
    query is kept only when its whole interval is observed: it ends at or before the subject's last visit, or the
    subject's record holds ``death_token`` (death ends follow-up, so a later interval is complete: what happened
    before death is all there is, as the task labels count it). Intervals that run past a record that simply
    stops (loss to follow-up, the data's end) would turn unobserved onsets into negatives; they are left out.
    """

    rate: float
    max_days: int
    death_token: int | None = None
    per_visit: int = 1  # draws per visit, each kept with probability ``rate`` (its own gap)


@dataclass
class EpochPlan:
    """One epoch of a ``TrainingPlan`` as arrays: its windows in training order and the contexts they pack into.

    Held for the whole epoch, so kept small: 16 bytes per window (subject, start, stop, place in its context),
    8 per context, and with horizon queries 8 per window and 8 per query.
    """

    subject: np.ndarray  # int32 [W], index of the window's subject in the split
    start: np.ndarray  # int32 [W], first visit
    stop: np.ndarray  # int32 [W], one past the last visit
    context_offsets: np.ndarray  # int64 [C + 1], offsets into context_windows
    context_windows: np.ndarray  # int32 [W], the windows of each context in order
    query_offsets: np.ndarray | None = None  # int64 [W + 1], offsets into the queries (None: no horizon queries)
    query_visit: np.ndarray | None = None  # int32 [Q], the query's visit within its window
    query_gap: np.ndarray | None = None  # int32 [Q], days

    def __len__(self) -> int:
        return len(self.subject)

    @property
    def n_contexts(self) -> int:
        return len(self.context_offsets) - 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.subject, self.start, self.stop, self.context_offsets, self.context_windows,
                                      self.query_offsets, self.query_visit, self.query_gap) if a is not None)

    def context(self, c: int) -> np.ndarray:
        """Indices of the windows packed into context ``c``."""
        return self.context_windows[self.context_offsets[c] : self.context_offsets[c + 1]]

    def window(self, j: int) -> Window:
        queries = None
        if self.query_offsets is not None and self.query_offsets[j + 1] > self.query_offsets[j]:
            q = slice(int(self.query_offsets[j]), int(self.query_offsets[j + 1]))
            queries = (self.query_visit[q].astype(np.int64), self.query_gap[q].astype(np.int64))
        return Window(int(self.subject[j]), int(self.start[j]), int(self.stop[j]), queries)

    def windows(self):
        """Every window, in training order."""
        return (self.window(j) for j in range(len(self)))


class TrainingPlan:
    """The deterministic order of training contexts for one epoch of a split.

    Epoch ``e`` is a function of (seed, e) only: each subject's visits are cut into windows (``split_visits``
    with a random first cut), the windows shuffled, then packed. So (epoch, index) is a complete data position
    for resuming, and every process of a distributed run computes the same plan.

    Memory: the plan holds the split's visit lengths (int32, 4 bytes per visit; with horizon queries also each
    visit's observed days, 4 more) and one ``EpochPlan``; the split itself is read block by block
    (``split_blocks``) and one subject at a time for batches.
    """

    def __init__(self, split, supervised: np.ndarray, context: int, pack: bool, max_window_fraction: float,
                 seed: int, pad_multiple: int = PAD_MULTIPLE, horizon_queries: HorizonQuerySampling | None = None,
                 summary: HistorySummary | None = None, recurrence: bool = False):
        self.split = split
        self.recurrence = recurrence  # build Batch.recurrence (model.recurrence_embedding)
        self.pad_multiple = pad_multiple  # the context itself for FlexAttention, which compiles per shape
        self.supervised = supervised
        self.context = context
        self.pack = pack
        self.max_window = int(context * max_window_fraction) if pack else context
        self.seed = seed
        self._subject_visits = read_block(split.subject_visits, 0, len(split.subject_visits))  # int64 [S + 1]
        self._visit_lengths = np.empty(len(split.visit_days), np.int32)  # tokens per visit
        for block in split_blocks(split):
            self._visit_lengths[block.first_visit : block.first_visit + len(block.visit_days)] = np.diff(block.visit_tokens)
        self.n_subjects = len(self._subject_visits) - 1
        self.skipped_single_visit = int(np.sum(np.diff(self._subject_visits) < 2))
        # visits longer than half a window keep their first visit_cap tokens (reported by the trainer)
        cap = visit_cap(self.max_window)
        self.truncated_visits = int(np.sum(self._visit_lengths > cap))
        self.truncated_tokens = int(np.sum(np.maximum(self._visit_lengths - cap, 0)))
        self._epochs: dict[int, EpochPlan] = {}
        self.horizon_queries = horizon_queries
        self.summary = summary
        self.queries_by_epoch: dict[int, int] = {}
        if horizon_queries is not None:
            self._observed_days = _observed_days(split, horizon_queries.death_token)

    def epoch(self, epoch: int) -> EpochPlan:
        """The windows and contexts of one epoch."""
        if epoch not in self._epochs:
            self._epochs = {}  # keep one epoch in memory
            self._epochs[epoch] = self._build(epoch)
        return self._epochs[epoch]

    def _build(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        # the windows in subject order, appended to compact arrays (no Python object per window)
        subjects, starts, stops, costs = array("i"), array("i"), array("i"), array("q")
        query_counts, query_visits, query_gaps = array("i"), array("i"), array("i")
        cap = visit_cap(self.max_window)
        has_query = gaps = None
        if self.horizon_queries is not None:
            has_query, gaps = self._query_draws(epoch)
        n_queries = 0
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
                    cost = int(clipped[start:stop].sum())
                    if self.summary is not None and start > 0:
                        cost += self.summary.max_tokens  # at most; the packing stays within the context
                    if has_query is not None:
                        # the last draw first, each by visit: a window short of room keeps the queries at the end,
                        # the first draw's (that of a run with one query per visit) and the latest visits'
                        last_first, js = np.nonzero(has_query[::-1, v0 + start : v0 + stop])
                        draw = len(has_query) - 1 - last_first
                        if start > 0:  # a visit shared with the previous window asks its queries there
                            draw, js = draw[js > 0], js[js > 0]
                        keep = slice(max(0, len(js) - (self.context - cost)), None)  # the window still fits
                        draw, js = draw[keep], js[keep]
                        query_counts.append(len(js))
                        query_visits.extend(js.tolist())
                        query_gaps.extend(gaps[draw, v0 + start + js].tolist())
                        cost += len(js)
                        n_queries += len(js)
                    subjects.append(i)
                    starts.append(start)
                    stops.append(stop)
                    costs.append(cost)
        order = rng.permutation(len(subjects))
        # each list is let go once shuffled, so that the build holds little more than the epoch it makes
        shuffled_costs, costs = _int_array(costs, np.int64)[order], None
        context_of = pack_windows(shuffled_costs, self.context) if self.pack else np.arange(len(order), dtype=np.int64)
        shuffled_costs = None
        n_contexts = int(context_of.max()) + 1 if len(context_of) else 0
        subject, subjects = _int_array(subjects, np.int32)[order], None
        start, starts = _int_array(starts, np.int32)[order], None
        stop, stops = _int_array(stops, np.int32)[order], None
        plan = EpochPlan(subject, start, stop,
                         context_offsets=np.concatenate([[0], np.cumsum(np.bincount(context_of, minlength=n_contexts))]),
                         context_windows=np.argsort(context_of, kind="stable").astype(np.int32))
        if has_query is not None:
            counts = _int_array(query_counts, np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            plan.query_offsets = np.concatenate([[0], np.cumsum(counts[order])])
            where = concatenated_ranges(offsets[:-1][order], offsets[1:][order])  # the queries in window order
            plan.query_visit = _int_array(query_visits, np.int32)[where]
            plan.query_gap = _int_array(query_gaps, np.int32)[where]
        self.queries_by_epoch[epoch] = n_queries
        return plan

    def _query_draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per draw and visit of the split ([per_visit, n]): whether it asks a horizon query in ``epoch`` (bool)
        and at what gap (int32). Their own stream, so the windows of a run without queries are unchanged: for
        draw k, ``random(n)`` for the asking, then ``random(n)`` for the gaps, drawn in chunks (the second
        stream advanced past the first ``n``), which gives the same numbers as two whole draws in 1 + 4 bytes
        per visit and draw. Draw 0 is seeded as the only draw of a run with one query per visit."""
        hq, n_visits = self.horizon_queries, len(self._observed_days)
        has_query = np.empty((hq.per_visit, n_visits), bool)
        gaps = np.empty((hq.per_visit, n_visits), np.int32)
        for k in range(hq.per_visit):
            key = [self.seed, epoch, 1] if k == 0 else [self.seed, epoch, 1, k]
            asking, gapping = (np.random.default_rng(key) for _ in range(2))
            gapping.bit_generator.advance(n_visits)  # one 64-bit step per double
            for begin in range(0, n_visits, _DRAW_CHUNK):
                n = min(_DRAW_CHUNK, n_visits - begin)
                gap = 1 + np.floor(gapping.random(n) * hq.max_days).astype(np.int64)
                has_query[k, begin : begin + n] = ((asking.random(n) < hq.rate)
                                                   & (gap <= self._observed_days[begin : begin + n]))
                gaps[k, begin : begin + n] = gap
        return has_query, gaps

    def n_contexts(self, epoch: int = 0) -> int:
        return self.epoch(epoch).n_contexts

    def batch(self, epoch: int, context_indices: Sequence[int]) -> Batch:
        plan = self.epoch(epoch)
        chosen = [plan.context(c).tolist() for c in context_indices]
        windows = {j: plan.window(j) for group in chosen for j in group}
        subjects = {}
        for group in chosen:
            for j in group:
                s = windows[j].subject
                if s not in subjects:
                    subjects[s] = self.split.subject(s)
        local = [windows[j] for group in chosen for j in group]
        subject_list = list(subjects)
        position = {s: k for k, s in enumerate(subject_list)}
        local = [Window(position[w.subject], w.start, w.stop, w.queries) for w in local]
        rows, k = [], 0
        for group in chosen:
            rows.append(list(range(k, k + len(group))))
            k += len(group)
        return windows_batch([subjects[s] for s in subject_list], local, self.supervised, self.max_window,
                             packed_rows=rows if self.pack else None, pad_multiple=self.pad_multiple,
                             summary=self.summary, recurrence=self.recurrence)


def _int_array(values: array, dtype) -> np.ndarray:
    """An ``array.array`` of integers as a numpy array of ``dtype``."""
    return np.frombuffer(values, np.dtype(values.typecode)).astype(dtype, copy=False) if len(values) else np.zeros(0, dtype)


def _observed_days(split, death_token: int | None) -> np.ndarray:
    """Per visit of ``split`` (int32): how many days after it the subject's record is observed, i.e. to the
    subject's last visit, or without end (int32's largest) when the record holds ``death_token``."""
    observed = np.empty(len(split.visit_days), np.int32)
    for block in split_blocks(split):
        if len(block.visit_days) == 0:
            continue
        subject_visits, visit_days = block.subject_visits, block.visit_days.astype(np.int64)
        per_subject = np.diff(subject_visits)
        subject_of_visit = np.repeat(np.arange(len(per_subject)), per_subject)
        last_day = visit_days[np.maximum(subject_visits[1:] - 1, 0)]
        days = last_day[subject_of_visit] - visit_days
        if death_token is not None:
            subject_tokens = block.visit_tokens[subject_visits]  # [s + 1]: where each subject's tokens start
            deaths = np.flatnonzero(block.tokens == death_token)
            died = np.zeros(len(per_subject), bool)
            died[np.searchsorted(subject_tokens, deaths, side="right") - 1] = True
            days = np.where(died[subject_of_visit], np.iinfo(np.int32).max, days)
        observed[block.first_visit : block.first_visit + len(days)] = days
    return observed
