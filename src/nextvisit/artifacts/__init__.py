"""The contracts between stages, each defined once and used by every stage.

- ``folders``: output folders (refuse a non-empty ``--out`` without ``--overwrite``, write atomically,
  nothing half-written, one writer at a time: a lock beside the folder);
- ``predictions``: the predictions folder every compared model writes (schema, atomic write, read, validation);
- ``meds_evaluation``: the export that meds-evaluation accepts (its schema's columns only, one file per task,
  horizon and split).

The history cut at a prediction time reads MEDS, so it lives with the MEDS reader (``nextvisit.data.histories``);
the model run folder builds the model, so it lives with it (``nextvisit.model.run``). Nothing here imports torch.
"""
