"""The contracts between stages, each defined once and used by every stage.

- ``folders``: output folders (refuse a non-empty ``--out`` without ``--overwrite``, write atomically,
  nothing half-written);
- ``predictions``: the predictions folder every compared model writes (schema, atomic write, read, validation);
- ``runs``: the model run folder (config, vocabulary and tokenizer files, weights, device and precision).

The history cut at a prediction time reads MEDS, so it lives with the MEDS reader (``nextvisit.data.histories``).
Nothing here imports a model: ``runs`` imports torch only when a function that needs it is called.
"""
