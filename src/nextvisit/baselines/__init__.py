"""Compared models behind one interface (``nextvisit.compare``): the same labels, splits, history cut and
removed input codes as the zero-shot forecast, and the same predictions folder (docs/interfaces.md §6), so
`nextvisit evaluate` treats every model alike.

- ``nextvisit.baselines.counts``: bag-of-codes counts in lookback windows + age/sex, logistic regression
  or gradient-boosted trees (``nextvisit baseline counts``).
- ``nextvisit.baselines.masked``: a BERT-style masked transformer, pretrained on the token store and fully
  fine-tuned per task (``nextvisit baseline masked pretrain|finetune``).
- ``nextvisit.baselines.oracle``: the simulator's true risk (``nextvisit oracle``), the ceiling.
"""
