"""nextvisit: next-visit generative pretraining on structured EHR (MEDS), zero-shot incidence
forecasting by horizon query, and honest evaluation against fine-tuned and classical baselines."""

__version__ = "0.1.0"
