"""nextvisit: next-visit generative pretraining on structured EHR (MEDS), zero-shot incidence forecasting by horizon
query, and honest evaluation against fine-tuned and classical baselines.

The Python API (``nextvisit.api``, docs/python.md) is exported here lazily: ``import nextvisit`` imports nothing
else, and ``nextvisit.load_run`` imports the API on first use. Its ``tokenize`` and ``evaluate`` are not: those
names are the stage packages ``nextvisit.tokenize`` and ``nextvisit.evaluate`` (importing a subpackage binds its
name here), so they are ``nextvisit.api.tokenize`` and ``nextvisit.api.evaluate``."""

import importlib

__version__ = "0.1.0"

_API = ("simulate", "pretrain", "label", "load_run", "load_meds", "load_store", "load_labels", "load_predictions",
        "MedsDataset", "Store", "Labels", "Run", "Predictions", "Sampling", "Evaluation", "UserError")


def __getattr__(name: str):
    if name in _API:
        # resolved at call time, as the command line resolves its verbs: the stages that import this package for
        # __version__ (cli, evaluate) must not be seen to import the API, and with it the model and torch
        return getattr(importlib.import_module("nextvisit.api"), name)
    raise AttributeError(f"module 'nextvisit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
