"""When the next visit happens: a discrete-time hazard over day bins (docs/model.md "Visit-time head").

The next-visit head is told the next visit's date (its SEP sits at that day), so rolling a subject forward
(``nextvisit sample``) needs the date from somewhere else: this head, read at the last token of each visit
(which sees that visit and the history, never the SEP after it, so nothing of the next date), gives one hazard
per bin of the gap in days to the next visit. Bin ``k`` holds the gaps ``edges[k-1] + 1 .. edges[k]``
(``edges[-1] = 0``); past the last edge the subject has no further visit within ``edges[-1]`` days
(the open bin, the survival of every hazard). Within a bin the gap is uniform over its days.

Why a hazard and not a softmax over bins: the same logits give the gap's law *given that no visit happened
up to a day* (a prediction time after the last visit), and a censored gap (known only to exceed some days) has
a likelihood too (``gap_nll`` with ``censored``), so the head stays usable for data with an end of follow-up.

Shapes: R rows, K bins (``len(edges)``; ``model.visit_time_edges``, checked by ``ModelConfig.validate``). Logits
[R, K]; hazard_k = sigmoid(logit_k).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bin_of(gaps: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin index [M] of each gap (days >= 1): the first edge at or above it; ``len(edges)`` for the open bin.

    >>> bin_of(torch.tensor([1, 2, 8, 10, 11, 4000]), torch.tensor([1, 2, 10, 3650])).tolist()
    [0, 1, 2, 2, 3, 4]
    """
    return torch.searchsorted(edges, gaps.to(edges.dtype), right=False)


def gap_nll(logits: torch.Tensor, gaps: torch.Tensor, edges: torch.Tensor,
            censored: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood [M] of the observed gaps (days) under the hazards: for a gap in bin b,
    -(sum_{k<b} log(1 - h_k) + log h_b) (the open bin: every hazard survived). A ``censored`` gap is known only
    to exceed ``gaps`` days: -(sum over the bins wholly at or below it of log(1 - h_k)). The within-bin uniform
    law adds the same constant for every model, so it is left out."""
    logits = logits.float()
    K = logits.shape[-1]
    b = bin_of(gaps, edges)
    log_survive = F.logsigmoid(-logits)  # log(1 - h)
    cumulative = torch.cumsum(log_survive, -1)
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative], -1)  # [M, K+1]: sum over bins < b
    survived = before.gather(1, b[:, None]).squeeze(1)
    event = F.logsigmoid(logits).gather(1, b.clamp(max=K - 1)[:, None]).squeeze(1)
    nll = -(survived + torch.where(b < K, event, torch.zeros_like(event)))
    if censored is not None:
        # survival to the censoring day c in bin b: every bin before it, then the part of bin b up to c under the
        # within-bin uniform law, log(1 - h_b (c - low_b + 1) / width_b) (the open bin: nothing more)
        lows, highs = _bounds(edges)
        index = b.clamp(max=K - 1)
        covered = ((gaps.double() - lows[index] + 1) / (highs[index] - lows[index] + 1)).clamp(0, 1)
        partial = torch.log1p(-torch.sigmoid(logits.double().gather(1, index[:, None]).squeeze(1)) * covered)
        partial = torch.where(b < K, partial, torch.zeros_like(partial)).to(nll.dtype)
        nll = torch.where(censored, -(survived + partial), nll)
    return nll


def bin_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(gap in bin k) [R, K+1] (the last column: the open bin), from the hazards."""
    log_h = F.logsigmoid(logits.double())
    log_survive = F.logsigmoid(-logits.double())
    before = torch.cat([torch.zeros_like(log_h[:, :1]), torch.cumsum(log_survive, -1)], -1)  # [R, K+1]
    return torch.cat([torch.exp(before[:, :-1] + log_h), torch.exp(before[:, -1:])], -1)


def cdf_at(logits: torch.Tensor, days: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """P(gap <= day) [R, len(days)] under the hazards (uniform within a bin; the open bin never ends)."""
    probs = bin_probabilities(logits)[:, :-1]  # [R, K]
    lows, highs = _bounds(edges)
    covered = ((days.double()[:, None] - lows[None, :] + 1) / (highs - lows + 1)[None, :]).clamp(0, 1)  # [D, K]
    return probs @ covered.T


def _bounds(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first day, last day) of each finite bin, as float64."""
    highs = edges.double()
    lows = torch.cat([highs.new_zeros(1), highs[:-1]]) + 1
    return lows, highs


def open_bin_probability(logits: torch.Tensor, edges: torch.Tensor, min_gaps: torch.Tensor) -> torch.Tensor:
    """P(no visit within the last edge) [R] given that the gap is at least ``min_gaps`` (the law ``sample_gaps``
    draws from)."""
    probs = bin_probabilities(logits)
    lows, highs = _bounds(edges)
    m = min_gaps.double()[:, None]
    share = ((highs[None, :] - torch.maximum(lows[None, :], m) + 1) / (highs - lows + 1)[None, :]).clamp(0, 1)
    finite = (probs[:, :-1] * share).sum(1)
    return probs[:, -1] / (finite + probs[:, -1]).clamp(min=1e-300)


def sample_gaps(logits: torch.Tensor, edges: torch.Tensor, min_gaps: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """Gaps [R] (days; 0 = the open bin: no further visit within ``edges[-1]`` days) drawn from the hazards
    given that the gap is at least ``min_gaps`` [R] (no visit before that day is known: a prediction time after
    the last visit), by inversion with ``uniforms`` [R, 2] (the bin, then the day within it).

    Every bin keeps its share of days at or after the minimum, so the law is exactly the hazard model's
    conditioned on ``gap >= min_gap``; a minimum past the last edge leaves only the open bin."""
    probs = bin_probabilities(logits)  # [R, K+1]
    lows, highs = _bounds(edges)
    m = min_gaps.double()[:, None]
    share = ((highs[None, :] - torch.maximum(lows[None, :], m) + 1) / (highs - lows + 1)[None, :]).clamp(0, 1)
    weights = probs * torch.cat([share, share.new_ones(share.shape[0], 1)], -1)
    cumulative = torch.cumsum(weights, -1)
    total = cumulative[:, -1:]
    K = len(edges)
    chosen = torch.searchsorted(cumulative / total.clamp(min=1e-300), uniforms[:, :1].double().contiguous(),
                                right=True).squeeze(1)
    chosen = torch.where(total.squeeze(1) > 0, chosen.clamp(max=K), torch.full_like(chosen, K))
    finite = chosen < K
    index = chosen.clamp(max=K - 1)
    first = torch.maximum(lows[index], min_gaps.double())
    last = highs[index]
    day = first + torch.floor(uniforms[:, 1].double() * (last - first + 1))
    day = torch.minimum(day, last)
    return torch.where(finite, day, torch.zeros_like(day)).long()


def edges_tensor(edges, device=None) -> torch.Tensor:
    return torch.tensor([int(e) for e in edges], dtype=torch.int64, device=device)


def observed_cdf(gaps: np.ndarray, days) -> np.ndarray:
    """Share of the observed gaps at or below each of ``days``."""
    gaps = np.sort(np.asarray(gaps))
    return np.searchsorted(gaps, np.asarray(days), side="right") / max(len(gaps), 1)


def gap_bin_counts(gaps: np.ndarray, edges) -> np.ndarray:
    """How many of ``gaps`` (days) fall in each gap bin (int64 [len(edges) + 1], the open bin last); counts of
    parts of the gaps add up to the counts of all of them."""
    edges = np.asarray([int(e) for e in edges])
    return np.bincount(np.searchsorted(edges, np.asarray(gaps), side="left"), minlength=len(edges) + 1)


def constant_hazard_logits(bin_counts: np.ndarray) -> np.ndarray:
    """Per bin, the logit of the hazard that fits gaps with these ``gap_bin_counts`` best with no covariates: the
    empirical bin shares turned into hazards, h_k = share_k / (share of gaps in bin k or later). A head starts
    here (as the next-visit head's bias starts at the code frequencies), so it need only learn what the visit
    adds. Bins no gap reaches get a hazard of 1e-4; the last finite bin keeps the open bin's mass."""
    counts = np.asarray(bin_counts, np.float64)
    n_edges = len(counts) - 1
    at_or_after = np.cumsum(counts[::-1])[::-1][:n_edges]
    hazard = np.where(at_or_after > 0, counts[:n_edges] / np.maximum(at_or_after, 1), 1e-4)
    hazard = np.clip(hazard, 1e-4, 1 - 1e-4)
    return np.log(hazard / (1 - hazard))
