"""nextvisit as a MEDS-DEV model: the ``model.yaml`` shipped beside this file and the stages its commands run.

MEDS-DEV (https://github.com/Medical-Event-Data-Standard/MEDS-DEV) benchmarks a model through the shell
commands of its ``model.yaml`` (``commands.unsupervised.train``, ``commands.supervised.train``,
``commands.supervised.predict``). It fills each command with Python's ``str.format`` (so a literal brace is
written twice) and runs it with bash (``set -e``) from a ``cmd.sh`` it writes into the stage's output folder,
which it creates first and marks ``.done`` on success (a stage with ``.done`` is not run again). The
variables it fills:

- ``{dataset_dir}``: the MEDS dataset; ``{output_dir}``: this stage's folder; ``{demo}``: ``True`` or ``False``;
- ``{labels_dir}``: the task's MEDS label files (supervised stages only);
- ``{model_initialization_dir}``: the previous stage's ``{output_dir}`` (when there is one);
- ``{split}``: the split to predict (predict only; ``held_out`` in MEDS-DEV's full runs).

MEDS-DEV passes no task configuration to a model, so the task's condition and horizon reach the commands
through environment variables that ``model.yaml`` turns into options (``ENVIRONMENT``); an unset variable
passes an empty value, which the options read as "not given".

The stages, one ``nextvisit medsdev`` verb each (``nextvisit.medsdev.stages``); ``OUT`` is ``{output_dir}``:

- unsupervised train (``unsupervised-train``): ``OUT/store``: the dataset tokenized (vocabulary and lab
  statistics fit on its train split; every split is tokenized, and pretraining reads train, validating on
  tuning); ``OUT/run``: the pretrained model run (preset ``tiny`` unless ``NEXTVISIT_PRESET`` says otherwise;
  ``{demo}`` makes it ``tiny`` and ``DEMO_STEPS`` steps); ``OUT/nextvisit.json``: what was done. Without
  ``NEXTVISIT_TOKENIZER_CONFIG`` the tokenizer has no future-date check (``max_time: null``): MEDS-DEV runs a
  recipe unattended on its datasets, and those it holds (MIMIC-IV) lie in the 22nd century.
- supervised train (``supervised-train``): fits nothing, since the model is scored zero-shot; it reads no
  label. It copies the pretrained run (without ``checkpoint/``, the optimizer state kept for resuming) to
  ``OUT/run``, so that the predict stage, which MEDS-DEV points at this folder, finds it, and writes
  ``OUT/nextvisit.json`` saying so.
- predict (``predict``): ``OUT/predictions.parquet``, the rows of ``{split}`` scored by the horizon query in
  the schema meds-evaluation reads (``nextvisit.artifacts.meds_evaluation``, with ``MEDS_DEV_PROBABILITY``),
  and ``OUT/nextvisit.json`` (every label row read, by what became of it). It is the only parquet file in
  ``OUT``: MEDS-DEV's evaluation reads every ``OUT/**/*.parquet`` as one set of predictions.

A stage that MEDS-DEV runs again (its earlier attempt failed, so no ``.done``) replaces its own ``store``,
``run`` and output files.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_YAML = HERE / "model.yaml"  # the commands and metadata MEDS-DEV reads
MODEL_README = HERE / "README.md"  # the model's description for MEDS-DEV's models folder
STAGE_FILE = "nextvisit.json"  # in each stage's output folder: what the stage did and counted
STORE, RUN, PREDICTIONS = "store", "run", "predictions.parquet"
DEMO_STEPS = 20  # pretraining steps of a demo run: enough to run every stage end to end, not to learn much

# What model.yaml reads from the environment, and the option each one fills (docs/meds-dev.md).
ENVIRONMENT = {
    "NEXTVISIT_PRESET": "--preset (unsupervised train; default tiny)",
    "NEXTVISIT_PRETRAIN_CONFIG": "--pretrain-config: a YAML overriding preset fields (docs/model.md)",
    "NEXTVISIT_TOKENIZER_CONFIG": "--tokenizer-config: a tokenizer YAML (docs/tokenizer.md)",
    "NEXTVISIT_MAX_STEPS": "--max-steps: optimizer steps of pretraining",
    "NEXTVISIT_MAX_MINUTES": "--max-minutes: time limit of pretraining",
    "NEXTVISIT_TASK": "--task (predict): a built-in task or a task YAML, for its condition codes",
    "NEXTVISIT_CONDITION_CODES": "--condition-codes (predict): comma-separated code prefixes, instead of a task",
    "NEXTVISIT_HORIZON_DAYS": "--horizon-days (predict): the horizon of the query",
    "NEXTVISIT_DEVICE": "--device (pretraining and predict): cpu, cuda or cuda:N",
}
