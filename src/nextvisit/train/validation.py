"""Validation during pretraining (docs/model.md, "Loss"): a fixed set of tuning contexts scored without the
repeat decay, against the code-frequency baseline (the best constant logit per token), overall, for new onsets
and repeats, and per code-frequency band.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from nextvisit.config import LossConfig, RunConfig
from nextvisit.model.losses import negative_term, positive_term
from nextvisit.model.sequence import HistorySummary, TrainingPlan
from nextvisit.model.visit_time import cdf_at, edges_tensor, gap_nll, observed_cdf
from nextvisit.tokenize.store import concatenated_ranges, split_blocks
from nextvisit.train.data import pad_multiple

VALIDATION_FIELDS = ["val_loss", "val_loss_frequency_baseline", "val_new_onset_auroc",
                     "val_new_onset_auroc_frequency_baseline", "val_new_onset_pos_loss", "val_repeat_pos_loss",
                     "val_new_onset_targets", "val_repeat_targets"]


# Gaps (days) at which the visit-time head's predicted share of next visits is compared with the observed share
CALIBRATION_DAYS = (1, 7, 30, 90, 180, 365, 730, 1825, 3650)


def validation_fields(edges, visit_time: bool = False) -> list[str]:
    """The metrics.csv columns of a validation: ``VALIDATION_FIELDS``, then the loss per frequency band (and the
    visit-time head's loss for a model with it)."""
    return VALIDATION_FIELDS + [f"val_loss_band[{name}]" for name in band_names(edges)] + \
        (["val_visit_time_loss"] if visit_time else [])


# -- token statistics and the code-frequency baseline -------------------------------------------------------------

def target_visit_share(split, vocab_size: int) -> np.ndarray:
    """Share of train visits after a subject's first (those that are targets) holding each token. Read block by
    block (``split_blocks``): memory of one block and the [V] counts."""
    counts = np.zeros(vocab_size, np.int64)
    n_target_visits = 0
    for block in split_blocks(split):
        # the first visit of each subject is never a target: count all tokens, then take its tokens back out
        first_visits = block.subject_visits[:-1][np.diff(block.subject_visits) > 0]
        in_first_visit = concatenated_ranges(block.visit_tokens[first_visits], block.visit_tokens[first_visits + 1])
        block_counts = np.bincount(block.tokens, minlength=len(counts))
        block_counts -= np.bincount(block.tokens[in_first_visit], minlength=len(block_counts))
        counts = np.pad(counts, (0, len(block_counts) - len(counts))) + block_counts  # a token past vocab_size widens it
        n_target_visits += len(block.visit_days) - len(first_visits)
    return counts.astype(np.float64) / max(n_target_visits, 1)


def best_constant_logits(rate: np.ndarray, config: LossConfig, iterations: int = 80) -> np.ndarray:
    """Per token, the constant logit that minimises the expected loss (no repeat decay) when the token is
    positive with probability ``rate``: the code-frequency baseline. For BCE this is logit(rate); focal loss
    with alpha != 0.5 moves it (golden-section search, the expected loss is unimodal in the logit).

    >>> from nextvisit.config import LossConfig
    >>> r = np.array([0.01, 0.3])
    >>> np.allclose(best_constant_logits(r, LossConfig(kind="bce")), np.log(r / (1 - r)), atol=1e-4)
    True
    """
    rate = torch.from_numpy(np.clip(np.asarray(rate, np.float64), 1e-9, 1 - 1e-9))

    def expected(x):
        return rate * positive_term(x, config.kind, config.gamma, config.alpha) + \
            (1 - rate) * negative_term(x, config.kind, config.gamma, config.alpha)

    lo, hi = torch.full_like(rate, -30.0), torch.full_like(rate, 30.0)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        left = expected(a) < expected(b)
        hi = torch.where(left, b, hi)
        lo = torch.where(left, lo, a)
    return ((lo + hi) / 2).numpy()


def frequency_bands(token_visit_share: np.ndarray, edges) -> np.ndarray:
    """Band index per token from its share of train visits holding it: 0 = most common. ``edges`` descending.

    >>> frequency_bands(np.array([0.5, 0.005, 0.0001]), (0.01, 0.001)).tolist()
    [0, 1, 2]
    """
    bands = np.zeros(len(token_visit_share), np.int64)
    for edge in edges:
        bands += token_visit_share < edge
    return bands


def band_names(edges) -> list[str]:
    edges = list(edges)
    names = [f">={edges[0]:.2%}"]
    names += [f"{lo:.2%}-{hi:.2%}" for hi, lo in zip(edges[:-1], edges[1:])]
    names.append(f"<{edges[-1]:.2%}")
    return names


# -- scores -------------------------------------------------------------------------------------------------------

@dataclass
class ValidationTotals:
    """Running sums over validation batches (no repeat decay). Loss per SEP-token pair; positives split into
    new onsets (token absent earlier in the window) and repeats; per code-frequency band; and the ranking of
    new onsets among tokens not yet seen in the window (AUROC per SEP, averaged; 0.5 = chance)."""

    n_bands: int
    loss_sum: float = 0.0
    pairs: int = 0
    new_loss: float = 0.0
    new_count: int = 0
    repeat_loss: float = 0.0
    repeat_count: int = 0
    new_auroc_sum: float = 0.0
    new_auroc_seps: int = 0

    def __post_init__(self):
        self.band_loss = np.zeros(self.n_bands)
        self.band_pairs = np.zeros(self.n_bands)

    @torch.no_grad()
    def add(self, logits, batch, supervised: torch.Tensor, token_band: torch.Tensor, config: LossConfig):
        logits = logits.double()  # sums of many small terms with a cancelling correction: keep precision
        N, V = logits.shape
        sup = supervised.to(logits.dtype)
        n_sup = int(supervised.sum())
        neg = negative_term(logits, config.kind, config.gamma, config.alpha) * sup  # [N, V]
        x = logits[batch.target_rows, batch.target_tokens]
        pos = positive_term(x, config.kind, config.gamma, config.alpha)
        correction = pos - negative_term(x, config.kind, config.gamma, config.alpha)
        self.loss_sum += config.scale * float(neg.sum() + correction.sum())
        self.pairs += N * n_sup
        seen = batch.target_seen
        self.new_loss += config.scale * float(pos[~seen].sum())
        self.new_count += int((~seen).sum())
        self.repeat_loss += config.scale * float(pos[seen].sum())
        self.repeat_count += int(seen.sum())
        # per band: negatives over the band's columns plus the positives' corrections
        band_cols = torch.nn.functional.one_hot(token_band, self.n_bands).to(logits.dtype) * sup[:, None]  # [V, bands]
        band_neg = neg.sum(0) @ band_cols
        band_corr = torch.zeros(self.n_bands, dtype=logits.dtype, device=logits.device).index_add_(
            0, token_band[batch.target_tokens], correction)
        self.band_loss += config.scale * (band_neg + band_corr).cpu().numpy()
        self.band_pairs += N * band_cols.sum(0).cpu().numpy()
        self._new_onset_auroc(logits, batch, supervised)

    def _new_onset_auroc(self, logits, batch, supervised):
        """Per SEP: AUROC of logits for new-onset positives vs supervised tokens not seen earlier in the window
        that did not occur. Tokens seen earlier are left out of both sides (that is the inflation)."""
        N, V = logits.shape
        T = batch.tokens.shape[1]
        rows, cols = batch.positions // T, batch.positions % T
        doc, att = batch.doc_ids[rows], batch.att_days[rows]  # [N, T]
        own_doc, own_att = batch.doc_ids[rows, cols], batch.att_days[rows, cols]  # [N]
        visible = (doc == own_doc[:, None]) & (att <= own_att[:, None])  # what each SEP attends, [N, T]
        sep_index, token_index = visible.nonzero(as_tuple=True)
        seen = torch.zeros(N, V, dtype=torch.bool, device=logits.device)
        seen[sep_index, batch.tokens[rows][sep_index, token_index]] = True
        positive = torch.zeros(N, V, dtype=torch.bool, device=logits.device)
        new = ~batch.target_seen
        positive[batch.target_rows[new], batch.target_tokens[new]] = True
        eligible = supervised[None, :] & ~seen
        scores = logits.masked_fill(~eligible, float("-inf"))
        ranks = scores.argsort(dim=1).argsort(dim=1).to(torch.float64)  # 0 = lowest
        n_ineligible = (~eligible).sum(1).to(torch.float64)
        ranks = ranks - n_ineligible[:, None]  # rank among eligible tokens
        n_pos = positive.sum(1).to(torch.float64)
        n_neg = eligible.sum(1).to(torch.float64) - n_pos
        rank_sum = (ranks * positive).sum(1)
        ok = (n_pos > 0) & (n_neg > 0)
        auroc = (rank_sum - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg)
        self.new_auroc_sum += float(auroc[ok].sum())
        self.new_auroc_seps += int(ok.sum())

    def summary(self, names: list[str]) -> dict:
        out = {
            "val_loss": self.loss_sum / max(self.pairs, 1),
            "val_new_onset_pos_loss": self.new_loss / max(self.new_count, 1),
            "val_repeat_pos_loss": self.repeat_loss / max(self.repeat_count, 1),
            "val_new_onset_auroc": self.new_auroc_sum / max(self.new_auroc_seps, 1),
            "val_new_onset_targets": self.new_count,
            "val_repeat_targets": self.repeat_count,
        }
        for name, loss, pairs in zip(names, self.band_loss, self.band_pairs):
            out[f"val_loss_band[{name}]"] = float(loss / pairs) if pairs else float("nan")
        return out


# -- the validation set -------------------------------------------------------------------------------------------

class Validation:
    """A fixed set of tuning contexts, scored without repeat decay, against the code-frequency baseline."""

    def __init__(self, store, config: RunConfig, supervised_np, device, autocast):
        self.config, self.device, self.autocast = config, device, autocast
        split, self.split_name = store.split("tuning"), "tuning"
        self.calibration: dict | None = None  # the visit-time head's, after a run of a model with it
        if len(split) == 0:
            split, self.split_name = store.split("train"), "train"
            print(f"nextvisit pretrain: {store.path}/tuning is empty; validating on train contexts", file=sys.stderr)
        plan = TrainingPlan(split, supervised_np, config.data.context, config.data.pack,
                            config.data.max_window_fraction, seed=config.train.seed + 1,
                            pad_multiple=pad_multiple(config),
                            summary=HistorySummary.of(store.vocab, config.data.history_summary_tokens),
                            recurrence=config.model.recurrence_embedding)
        n = plan.n_contexts(0)
        n = n if config.train.eval_contexts == 0 else min(n, config.train.eval_contexts)
        mb = config.train.micro_batch
        self.batches = [plan.batch(0, range(i, min(i + mb, n))) for i in range(0, n, mb)]
        vocab_size = config.model.vocab_size
        share = target_visit_share(store.split("train"), vocab_size)
        bands = frequency_bands(share, config.loss.frequency_band_edges)
        self.names = band_names(config.loss.frequency_band_edges)
        self.token_band = torch.from_numpy(bands).to(device)
        self.supervised = torch.from_numpy(supervised_np).to(device)
        # the fairest constant predictor: per token, the logit minimising this loss at its train visit rate
        self.baseline_logits = torch.from_numpy(best_constant_logits(share, config.loss)).float().to(device)
        self.baseline = self._score(lambda batch: self.baseline_logits.expand(len(batch.positions), -1))

    def _score(self, logits_of) -> dict:
        totals = ValidationTotals(n_bands=len(self.names))
        for batch in self.batches:
            batch = batch.to(self.device)
            totals.add(logits_of(batch), batch, self.supervised, self.token_band, self.config.loss)
        return totals.summary(self.names)

    @torch.no_grad()
    def run(self, model) -> dict:
        was_training = model.training
        model.eval()
        timed = model.visit_time is not None
        gaps, time_logits = [], []

        def logits_of(batch):
            with self.autocast():
                if not timed:
                    return model.query_logits(batch).float()
                logits, at_visits = model(batch.tokens, batch.days, batch.att_days, batch.doc_ids, batch.positions,
                                          is_query=batch.is_query, time_positions=batch.time_positions,
                                          recurrence=batch.recurrence)
            gaps.append(batch.time_gaps)
            time_logits.append(at_visits.float())
            return logits.float()

        result = self._score(logits_of)
        if timed:
            result.update(self._visit_time(model, torch.cat(time_logits), torch.cat(gaps)))
        model.train(was_training)
        result["val_loss_frequency_baseline"] = self.baseline["val_loss"]
        result["val_new_onset_auroc_frequency_baseline"] = self.baseline["val_new_onset_auroc"]
        return {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in result.items()}

    def _visit_time(self, model, logits: torch.Tensor, gaps: torch.Tensor) -> dict:
        """The visit-time head on the validation visits: its loss, and its calibration (mean predicted share of
        next visits within each of ``CALIBRATION_DAYS`` against the observed share), kept in ``calibration``."""
        edges = edges_tensor(model.config.visit_time_edges, logits.device)
        days = torch.tensor(CALIBRATION_DAYS, device=logits.device)
        predicted = cdf_at(logits, days, edges).mean(0).cpu().numpy() if len(gaps) else np.full(len(days), np.nan)
        observed = observed_cdf(gaps.cpu().numpy(), CALIBRATION_DAYS)
        self.calibration = {"split": self.split_name, "visits": int(len(gaps)), "days": list(CALIBRATION_DAYS),
                            "predicted_share": [round(float(p), 5) for p in predicted],
                            "observed_share": [round(float(o), 5) for o in observed],
                            "mean_gap_days_observed": float(gaps.double().mean()) if len(gaps) else float("nan")}
        return {"val_visit_time_loss": float(gap_nll(logits, gaps, edges).mean()) if len(gaps) else float("nan")}
