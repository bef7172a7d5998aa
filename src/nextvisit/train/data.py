"""The training data of a run: the plan of packed train contexts (``nextvisit.model.sequence.TrainingPlan``) and
the micro-batches of each optimizer step, which advance the data position (epoch, context index)."""

from __future__ import annotations

from nextvisit.config import RunConfig
from nextvisit.data.meds import DEATH_CODE
from nextvisit.errors import UserError
from nextvisit.model.sequence import PAD_MULTIPLE, HistorySummary, HorizonQuerySampling, TrainingPlan
from nextvisit.tokenize.store import TokenStore
from nextvisit.model.distributed import Distributed


def pad_multiple(config: RunConfig) -> int:
    """FlexAttention compiles once per shape: give it full contexts. SDPA takes any width."""
    return config.data.context if config.model.attention == "flex" else PAD_MULTIPLE


def horizon_query_sampling(store: TokenStore, config: RunConfig) -> HorizonQuerySampling | None:
    """Where training asks horizon queries (``model.horizon_queries``), or None. A subject whose record holds the
    death code is observed to the end (``HorizonQuerySampling``)."""
    if not config.model.horizon_queries:
        return None
    death = store.vocab.index.get(DEATH_CODE)
    return HorizonQuerySampling(config.data.horizon_query_rate, config.data.horizon_query_max_days, death,
                                config.data.horizon_queries_per_visit)


def training_plan(store: TokenStore, config: RunConfig, supervised_np):
    """(train split, its ``TrainingPlan``); a ``UserError`` when there is nothing to learn from."""
    if not supervised_np.any():
        raise UserError(f"{store.path}/vocab.json: no code or lab tokens to predict")
    train_split = store.split("train")
    if len(train_split) == 0:
        raise UserError(f"{store.path}: the train split is empty")
    plan = TrainingPlan(train_split, supervised_np, config.data.context, config.data.pack,
                        config.data.max_window_fraction, config.train.seed, pad_multiple=pad_multiple(config),
                        horizon_queries=horizon_query_sampling(store, config),
                        summary=HistorySummary.of(store.vocab, config.data.history_summary_tokens),
                        recurrence=config.model.recurrence_embedding)
    if plan.n_contexts(0) == 0:
        raise UserError(f"{store.path}: no train subject has two visits; nothing to learn from")
    return train_split, plan


def step_micro_batches(plan: TrainingPlan, state: dict, batch_contexts: int, micro_batch: int, dist: Distributed):
    """This process's micro-batches of the next step; advances the data position (epoch, index).

    Process r of P takes the r-th contiguous share of the step's contexts (``Distributed.part``). When
    ``batch_contexts / P`` is a multiple of ``micro_batch``, every micro-batch of a distributed step is one of the
    micro-batches one process takes at the same global batch: the same contexts, padded alike, so each has the
    same gradient bit for bit (only the order of their sum differs, docs/scale.md)."""
    chosen = []  # (epoch, context index)
    epoch, index = state["epoch"], state["index"]
    while len(chosen) < batch_contexts:
        n = plan.n_contexts(epoch)
        take = min(batch_contexts - len(chosen), n - index)
        chosen += [(epoch, i) for i in range(index, index + take)]
        index += take
        if index >= n:
            epoch, index = epoch + 1, 0
    state["epoch"], state["index"] = epoch, index
    mine = chosen[dist.part(len(chosen))]
    batches = []
    for k in range(0, len(mine), micro_batch):
        part = mine[k : k + micro_batch]
        by_epoch = {}
        for e, i in part:
            by_epoch.setdefault(e, []).append(i)
        for e, indices in by_epoch.items():
            batches.append(plan.batch(e, indices))
    return batches
