"""What every next-visit scorer shares: the aggregate of a condition's logits at a SEP into one risk, the
condition's token ids in the run's vocabulary, and the checks that a run, its store and its labels agree."""

from __future__ import annotations

import torch

from nextvisit.artifacts.predictions import PREDICTION_SPLITS
from nextvisit.errors import UserError
from nextvisit.tasks import Task
from nextvisit.tokenize.store import SPLITS, Vocabulary

AGGREGATORS = ("sum_logits", "noisy_or", "max", "logsumexp")
SCORED_SPLITS = PREDICTION_SPLITS  # zero-shot needs no train rows


def aggregate(logits: torch.Tensor, token_ids: torch.Tensor, aggregator: str = "sum_logits") -> torch.Tensor:
    """Risk [N] (float64) from logits [N, V] over the condition's token ids.

    - ``sum_logits``: sigmoid(sum of logits) (the paper's default)
    - ``noisy_or``: 1 - prod(1 - sigmoid(logit)), i.e. P(any token) if tokens were independent
    - ``max``: sigmoid(max logit)
    - ``logsumexp``: sigmoid(logsumexp of logits), a smooth max

    >>> z = torch.tensor([[0.0, 0.0, 5.0]])
    >>> round(float(aggregate(z, torch.tensor([0, 1]), "noisy_or")[0]), 4)
    0.75
    >>> round(float(aggregate(z, torch.tensor([0, 1]), "sum_logits")[0]), 4)
    0.5
    """
    z = logits.index_select(-1, token_ids.to(logits.device)).double()  # [N, K]
    if aggregator == "sum_logits":
        return torch.sigmoid(z.sum(-1))
    if aggregator == "noisy_or":
        # 1 - prod(sigmoid(-z)) computed in log space
        return -torch.expm1(torch.nn.functional.logsigmoid(-z).sum(-1))
    if aggregator == "max":
        return torch.sigmoid(z.max(-1).values)
    if aggregator == "logsumexp":
        return torch.sigmoid(torch.logsumexp(z, -1))
    raise UserError(f"aggregator {aggregator!r} is unknown; choose one of {', '.join(AGGREGATORS)}")


def check_same_vocab(expected: Vocabulary, found: Vocabulary, expected_source: str, found_source: str) -> None:
    """A clear error when two vocabularies differ (ids would mean different tokens)."""
    if expected.tokens == found.tokens:
        return
    if len(expected) != len(found):
        detail = f"{len(found)} tokens vs {len(expected)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(expected.tokens, found.tokens)) if a != b)
        detail = f"token id {i} is {found.tokens[i]!r} there but {expected.tokens[i]!r} in the run"
    raise UserError(f"{found_source}: vocabulary does not match {expected_source} ({detail}); "
                    "tokenize with the run's vocabulary (`nextvisit tokenize --vocab-from RUN`)")


def condition_token_ids(task: Task, vocab: Vocabulary, source: str) -> torch.Tensor:
    ids = task.condition.token_ids(vocab)
    if len(ids) == 0:
        raise UserError(f"{source}: no token of task {task.name!r}'s condition (field 'condition') is in the "
                        "vocabulary, so the model cannot score it; use a task whose codes the training data held")
    return torch.from_numpy(ids)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def parse_splits(text: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in str(text).split(",") if s.strip())
    if splits == ("all",):
        return SPLITS
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text!r}: expected a comma-separated list of {', '.join(SPLITS)} (or 'all')")
    return splits
