"""The masked-transformer baseline (METHOD §6): a BERT-style encoder pretrained with masked-token prediction
on the same token store as the next-visit model, then fully fine-tuned per task with a ``CLS`` head.

Input layout of one subject window (visits ``v_1..v_n``, the most recent that fit the context)::

    CLS  v_1 tokens  SEP  v_2 tokens  SEP ...  v_n tokens  SEP

- **Positions are day offsets** through rotary embeddings (as in the next-visit model): every token of a visit
  and the SEP closing it get the visit's day minus the window's first visit day. The ``CLS`` token gets the
  day of the prediction time (fine-tuning) or of the last visit (pretraining), so it knows how long ago
  each visit was.
- **Token type = visit index** in the window (1, 2, ...; ``CLS`` is 0), a learned embedding, clipped at
  ``max_visit_types - 1``.
- Attention is bidirectional over the window; padding is never attended.

Pretraining masks ``mask_prob`` of the non-special tokens (80% ``MASK``, 10% a random token, 10% unchanged)
and predicts them with a head tied to the token embedding. Fine-tuning puts one logit per (task, horizon) on
the ``CLS`` state (one head per horizon, sharing the encoder), trains every weight with BCE on train-split
labels, and keeps the weights with the best tuning-split AUROC (early stopping). It is a compared model
(``MaskedModel``, ``nextvisit.compare``): histories are the label rows' events cut at the prediction time
(``nextvisit.data.histories``), re-tokenized with the run's fitted vocabulary
(``nextvisit.model.run.read_tokenizer(RUN)``).

Modules: ``config`` (configs and presets), ``model`` (the encoder, ``load_run``), ``windows`` (the input
layout), ``pretrain`` (masked-token pretraining), ``inputs`` (the histories fine-tuning reads),
``finetune`` (``MaskedModel``, ``finetune``, ``predict``).
"""

from nextvisit.baselines.masked.config import PRESETS, FinetuneConfig, MaskedModelConfig, PretrainConfig, resolve_config
from nextvisit.baselines.masked.finetune import MaskedModel, finetune, finetune_cli, predict
from nextvisit.baselines.masked.model import MaskedEncoder, load_run
from nextvisit.baselines.masked.pretrain import pretrain, pretrain_cli
from nextvisit.baselines.masked.windows import collate, history_window, recent_start, visit_costs, window_arrays

__all__ = [
    "PRESETS", "FinetuneConfig", "MaskedModelConfig", "PretrainConfig", "resolve_config",
    "MaskedModel", "finetune", "finetune_cli", "predict", "MaskedEncoder", "load_run", "pretrain", "pretrain_cli",
    "collate", "history_window", "recent_start", "visit_costs", "window_arrays",
]
