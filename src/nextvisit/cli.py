"""The command line: one verb per stage, thin. Each verb parses its options here and hands them to the
module that does the work (imported lazily, so `--help` stays fast)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from nextvisit.errors import UserError


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line that says what to do, with no usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    """A comma-separated list of whole numbers of at least 1."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers of at least 1, got {text!r}")
    return values


def _max_time(text: str) -> str:
    """--max-time: ``now``, ``none`` or an ISO date or datetime without a time zone, checked by the tokenizer
    config's own rule (imported only when the option is given)."""
    if text in ("now", "none"):
        return text
    from nextvisit.tokenize.config import TokenizerConfig

    try:
        TokenizerConfig(max_time=text).max_time_value()
    except UserError:
        raise argparse.ArgumentTypeError(
            f"expected now, none or an ISO date or datetime without a time zone (e.g. 2203-01-01 or "
            f"2203-01-01T12:00), got {text!r}") from None
    return text


def _add_inference_options(p) -> None:
    """--device, --precision and --overwrite of the verbs that run a pretrained model (forecast, occurrence)."""
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bfloat16 autocast where the device supports it, as in training, else "
                        "float32; risks are aggregated in float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _device(text: str) -> str:
    """A torch device name this machine has: cpu, cuda or cuda:N (torch is imported only when given)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
    return text


def _or_none(kind):
    """An option that ``model.yaml`` fills from an environment variable (``nextvisit medsdev``): an empty value,
    an unset variable's, means the option was not given."""

    def parse(text: str):
        return None if text.strip() == "" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its error message
    return parse


def _flag(text: str) -> bool:
    """MEDS-DEV's ``{demo}`` (``True`` or ``False``), or true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _handler(target: str):
    """`module:function` resolved at call time."""

    def call(args):
        module_name, function_name = target.split(":")
        return getattr(importlib.import_module(module_name), function_name)(args)

    return call


def _add_simulate(verbs) -> None:
    p = verbs.add_parser(
        "simulate",
        help="write a synthetic health system as a MEDS 0.4 dataset",
        description=(
            "Simulate a health system's structured records (visits, ICD-10-CM diagnoses, RxNorm drugs, "
            "LOINC labs and vitals) and write them as a MEDS 0.4 dataset with train/tuning/held_out splits. "
            "The simulator knows each subject's true risk (see nextvisit.data.simulate.oracle_risk)."
        ),
    )
    p.add_argument("--subjects", type=_positive_int, default=1000, help="number of subjects (default 1000)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical output")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--first-subject-id", type=_positive_int, default=1, metavar="N",
                   help="subject ids start at N (default 1); a subject's record depends only on the seed and its "
                        "id, so another seed and ids after a first population's give a second, disjoint one")
    p.add_argument("--split", default=None, choices=["train", "tuning", "held_out"],
                   help="put every subject in this split (default: draw train/tuning/held_out 80/10/10), e.g. "
                        "held_out for a population meant only for evaluation")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="worker processes (default: CPU count, at most one per 1,000 subjects)")
    p.set_defaults(func=_handler("nextvisit.data.simulate.cli:run"))


def _add_convert(verbs) -> None:
    p = verbs.add_parser("convert", help="convert other formats to MEDS (OMOP CDM)",
                         description="Convert a dataset in another format into a MEDS 0.4 dataset.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=_Parser, required=True)
    q = formats.add_parser(
        "omop",
        help="OMOP CDM 5.4 tables -> MEDS, through the maintained converter meds_etl_omop",
        description=(
            "Convert an OMOP CDM 5.4 folder (person, concept, and any of visit_occurrence, condition_occurrence, "
            "drug_exposure, procedure_occurrence, measurement, observation, death, device_exposure, note, "
            "visit_detail; CSV, CSV.gz, parquet or folders of shards, names in any case) into MEDS 0.4 with "
            "meds_etl_omop (meds_etl " "0.3.11, run in its own environment: `make omop-env`). Codes are "
            "vocabulary_id//concept_code (e.g. SNOMED//26929004, RxNorm//..., LOINC//...) from the concept "
            "table; splits are drawn per person; every input row is accounted for in "
            "OUT/metadata/omop_conversion.json (events written, rows dropped per field and reason). docs/omop.md."
        ),
    )
    q.add_argument("omop_dir", type=Path, metavar="OMOP_DIR", help="folder holding the OMOP CDM tables")
    q.add_argument("--out", type=Path, required=True, help="MEDS dataset folder to write")
    q.add_argument("--concepts", default="standard", choices=["standard", "source"],
                   help="standard (default): each row's standard concept (*_concept_id); source: its source "
                        "concept (*_source_concept_id) where non-zero, else the standard one")
    q.add_argument("--converter", type=Path, default=None, metavar="PATH",
                   help="the meds_etl_omop executable (default: $NEXTVISIT_MEDS_ETL_OMOP, else on PATH, else "
                        "the project's .venv-omop from `make omop-env`)")
    q.add_argument("--tables", default=None, metavar="T1,T2",
                   help="convert only these tables (person always), e.g. condition_occurrence,drug_exposure "
                        "(default: every table the converter reads that the folder holds)")
    q.add_argument("--split-seed", type=int, default=0, help="seed of the train/tuning/held_out draw (default 0)")
    q.add_argument("--split-fractions", type=_fractions, default=None, metavar="TRAIN,TUNING,HELD_OUT",
                   help="shares of persons per split (default 0.8,0.1,0.1)")
    q.add_argument("--shards", type=_positive_int, default=None,
                   help="MEDS data shards (default: one per 100,000 persons)")
    q.add_argument("--workers", type=_positive_int, default=1, help="converter processes (default 1)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.set_defaults(func=_handler("nextvisit.data.omop:run_cli"))


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated shares, got {text!r}") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three shares of at least 0 summing to 1, got {text!r}")
    return values


def _add_tokenize(verbs) -> None:
    p = verbs.add_parser(
        "tokenize",
        help="turn a MEDS dataset into a visit-structured token store",
        description=(
            "Validate a MEDS dataset and write a memory-mapped token store: one visit per calendar day, "
            "vocabulary and lab statistics fit on the train split only, a manifest counting every dropped "
            "or replaced event by reason."
        ),
    )
    p.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset folder (data/ and metadata/)")
    p.add_argument("--out", type=Path, required=True, help="token store folder to write")
    p.add_argument("--config", type=Path, default=None, help="tokenizer config YAML (fields and defaults: docs/tokenizer.md)")
    p.add_argument("--vocab-from", type=Path, default=None, metavar="STORE_OR_RUN",
                   help="reuse the vocabulary and lab statistics of an existing token store or model run")
    p.add_argument("--max-time", type=_max_time, default=None, metavar="DATE|now|none",
                   help="the guard against future dates: events after this time are an error (or counted and "
                        "dropped with future_events: drop); an ISO date or datetime, now, or none (no check, e.g. "
                        "for date-shifted data such as MIMIC). Overrides max_time of the --config file (default: "
                        "its max_time, else the --vocab-from store's, else now); recorded in STORE/tokenizer.yaml")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="worker processes (default: one per 2M events, at most the CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_handler("nextvisit.tokenize.dataset:run_cli"))


def _add_inspect(verbs) -> None:
    p = verbs.add_parser("inspect", help="print one subject's timeline from a token store",
                         description="Print a readable timeline: date, age, tokens with code descriptions.")
    p.add_argument("store", type=Path, metavar="STORE", help="token store folder")
    p.add_argument("--subject", type=int, required=True, metavar="ID", help="subject_id to show")
    p.set_defaults(func=_handler("nextvisit.tokenize.timeline:inspect_cli"))


def _add_pretrain(verbs) -> None:
    p = verbs.add_parser(
        "pretrain",
        help="pretrain the next-visit model on a token store",
        description=(
            "Train the next-visit transformer: at every visit boundary predict the set of codes of the next "
            "visit, with sigmoid focal loss and repeat regularization. Many GPUs or machines: run under torchrun "
            "(docs/scale.md)."
        ),
    )
    p.add_argument("store", type=Path, metavar="STORE", help="token store folder")
    p.add_argument("--out", type=Path, required=True, help="model run folder (checkpoints, metrics, config)")
    p.add_argument("--preset", default="tiny", help="model/training preset: tiny, small or paper (default tiny)")
    p.add_argument("--config", type=Path, default=None, help="YAML overriding preset fields (docs/model.md)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop training after this many optimizer steps (default: the preset's train.max_steps)")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_handler("nextvisit.train.trainer:run_cli"))


def _add_label(verbs) -> None:
    p = verbs.add_parser(
        "label",
        help="build incidence labels for a task on a MEDS dataset",
        description=(
            "Apply a task (built-in name or YAML file) to a MEDS dataset: landmark prediction times, "
            "prevalent cases excluded, censoring counted. Writes the MEDS label schema plus a reason column. "
            "An ACES task config is labelled by es-aces instead (its rows, every excluded trigger counted); "
            "docs/tasks.md, 'ACES task configs'."
        ),
    )
    p.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset folder")
    p.add_argument("task", metavar="TASK",
                   help="built-in task (dementia, knee_oa, dementia_snomed, knee_oa_snomed; docs/tasks.md), a task YAML "
                        "file, or an ACES task config (a YAML with predicates, trigger, windows), labelled by es-aces")
    p.add_argument("--out", type=Path, required=True, help="labels folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    aces = p.add_argument_group(
        "ACES task configs", "ACES chooses the rows and labels them; these options give the horizon query that "
        "forecast and sample ask of those rows (stored in LABELS/task.yaml)")
    aces.add_argument("--condition-predicate", metavar="NAME", default=None,
                      help="the predicate whose codes are the condition (default: the label window's predicate); a "
                           "regex that is not a plain list of prefixes is resolved to the dataset's matching codes")
    aces.add_argument("--codes", metavar="CODES", default=None,
                      help="the condition's MEDS codes instead of a predicate, comma-separated; an entry ending in * is "
                           "a prefix, e.g. 'ICD10CM//F03*,RXNORM//4637'")
    aces.add_argument("--horizon-days", type=_positive_int, metavar="H", default=None,
                      help="the horizon in days (default: the label window's length, where it is a whole number of days "
                           "starting at the prediction time)")
    aces.add_argument("--remove-from-inputs", metavar="CODES", default=None,
                      help="codes no model may read, as for --codes (default none)")
    aces.add_argument("--task-name", metavar="NAME", default=None,
                      help="the labels' task name (default: the config file's name)")
    p.set_defaults(func=_handler("nextvisit.tasks:label_cli"))


def _add_export_aces(verbs) -> None:
    p = verbs.add_parser(
        "export-aces",
        help="write a task as an ACES task config (one horizon per config)",
        description=(
            "Write a built-in task or task YAML at one horizon as an ACES task config: a visit trigger, no condition "
            "code and no death up to it, the task's minimum history and age, the label window (trigger, trigger + H], "
            "and MEDS-DEV's censoring protection window (an event at or after the horizon's end). ACES cannot "
            "express landmark sampling, the end-of-day prediction time, censored rows and their weights, the data's "
            "end or remove_from_inputs: the file's header and docs/tasks.md list each. Label the file with "
            "`nextvisit label MEDS_DIR FILE.yaml --out LABELS` or aces-cli."
        ),
    )
    p.add_argument("task", metavar="TASK", help="built-in task (docs/tasks.md) or a task YAML file")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.yaml", help="ACES config file to write")
    p.add_argument("--horizon-days", type=_positive_int, metavar="H", default=None,
                   help="the horizon to export; needed when the task has several (the built-in tasks: 730 or 1825)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_handler("nextvisit.tasks.aces:export_cli"))


def _add_forecast(verbs) -> None:
    p = verbs.add_parser(
        "forecast",
        help="zero-shot risk by horizon query",
        description=(
            "Score labels with a pretrained next-visit model: history cut at the prediction time, one query "
            "visit boundary at last visit day + horizon, risk aggregated over the condition's codes. Under torchrun "
            "the processes share the queries and process 0 writes the one predictions file (docs/scale.md)."
        ),
    )
    p.add_argument("run", type=Path, metavar="RUN", help="model run folder from `nextvisit pretrain`")
    p.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset the labels refer to")
    p.add_argument("labels", type=Path, metavar="LABELS", help="labels folder from `nextvisit label`")
    p.add_argument("--out", type=Path, required=True, help="predictions folder to write")
    p.add_argument("--aggregator", default="sum_logits",
                   choices=["sum_logits", "noisy_or", "max", "logsumexp"], help="risk aggregator (default sum_logits)")
    p.add_argument("--multi-horizon", action="store_true",
                   help="average the query over yearly intermediate horizons up to the horizon")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="subjects per forward pass (default 64)")
    p.add_argument("--history-tokens", type=_positive_int, default=None,
                   help="most recent history tokens before the query (default: the run's data.query_max_tokens; "
                        "longer than its training windows asks the model to read more than it was trained on)")
    p.add_argument("--splits", default="tuning,held_out",
                   help="comma-separated label splits to score (default tuning,held_out), or 'all' "
                        "(e.g. for an external cohort)")
    _add_inference_options(p)
    p.set_defaults(func=_handler("nextvisit.predict.horizon:run_cli"))


def _add_sample(verbs) -> None:
    p = verbs.add_parser(
        "sample",
        help="Monte Carlo next-visit trajectories and the risks they give",
        description=(
            "Roll N trajectories per labelled history forward visit by visit (the visit-time head draws when, the "
            "next-visit head draws which codes: one untruncated Bernoulli per token), KV-cached, until the row's "
            "horizon or death. Writes OUT/trajectories/<sample>.parquet (MEDS events plus prediction_time, one file "
            "per sample index, as meds-trajectory-evaluation reads them), OUT/monte_carlo and OUT/rao_blackwell "
            "(predictions folders for `nextvisit evaluate`: share of trajectories with an onset, and the sum of "
            "the model's onset probabilities along them) and OUT/sampling.json (counts: how trajectories ended, "
            "undecided ones, context slides, redrawn empty visits; throughput)."
        ),
    )
    p.add_argument("run", type=Path, metavar="RUN", help="model run folder from `nextvisit pretrain` (visit-time head)")
    p.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset the labels refer to")
    p.add_argument("labels", type=Path, metavar="LABELS", help="labels folder from `nextvisit label`")
    p.add_argument("--out", type=Path, required=True, help="folder to write (trajectories, predictions, sampling.json)")
    p.add_argument("--samples", type=_positive_int, default=16, help="trajectories per history (default 16)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the code logits by this (default 1: the model's own probabilities)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (default 0); a trajectory depends on (seed, subject, prediction time, sample) only")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="trajectories advanced together (default 256; bounds the KV cache's memory)")
    p.add_argument("--max-visits", type=_positive_int, default=500,
                   help="generated visits per trajectory (default 500); one still short of its horizon is undecided")
    p.add_argument("--splits", default="tuning,held_out",
                   help="comma-separated label splits to sample (default tuning,held_out), or 'all'")
    p.add_argument("--no-trajectories", action="store_true", help="write the risks only, not the trajectories")
    p.add_argument("--keep-fraction", type=float, default=0.5,
                   help="when a trajectory outgrows the window, re-encode its most recent visits filling this share "
                        "of it (default 0.5; higher keeps more history per step and slides, and costs, more often)")
    p.add_argument("--sample-counts", type=_int_list, default=[],
                   help="also write the risks of the first k samples for each k (e.g. 1,4,16): OUT/monte_carlo_nK "
                        "and OUT/rao_blackwell_nK, the cost of N from one run")
    _add_inference_options(p)
    p.set_defaults(func=_handler("nextvisit.predict.sample:run_cli"), precision="fp32")
    for action in p._actions:  # float32 by default here (docs/sampling.md), not the other verbs' auto
        if action.dest == "precision":
            action.help = ("fp32 (default: a trajectory is then the same whatever its batch; bfloat16 rounding can "
                           "flip a draw near its probability), auto or bf16")


def _add_occurrence(verbs) -> None:
    p = verbs.add_parser(
        "occurrence",
        help="score 'any code of the condition in the next visit' (the inflation analysis)",
        description=(
            "At the visit boundaries of a token store split (by default the task's landmark cohort: its age, "
            "history and landmark sampling rules), score whether the next visit holds any code of the task's "
            "condition, marking rows where the subject already had such a code. Comparing all rows with new "
            "onsets only shows how recurring codes inflate metrics."
        ),
    )
    p.add_argument("run", type=Path, metavar="RUN", help="model run folder")
    p.add_argument("store", type=Path, metavar="STORE", help="token store (tokenized with the run's vocabulary)")
    p.add_argument("task", metavar="TASK", help="built-in task name or task YAML (its code set is used)")
    p.add_argument("--out", type=Path, required=True, help="predictions folder")
    p.add_argument("--splits", default="tuning,held_out",
                   help="comma-separated splits to score, or 'all' (default tuning,held_out)")
    p.add_argument("--aggregator", default="sum_logits",
                   choices=["sum_logits", "noisy_or", "max", "logsumexp"], help="risk aggregator (default sum_logits)")
    p.add_argument("--mode", default="windows", choices=["windows", "recent"],
                   help="windows: every visit boundary once, windows cut as in training; "
                        "recent: only the boundaries in each subject's most recent window")
    p.add_argument("--cohort", default="task", choices=["task", "eligible", "all"],
                   help="task (default): only the boundaries after the task's landmarks (min age, min history, its "
                        "seeded sampling and max_per_subject; prevalent subjects kept as the recurrences); "
                        "eligible: the age and history rules without the sampling (every next-visit onset of an "
                        "eligible subject); all: every visit boundary at every age")
    p.add_argument("--reference-out", type=Path, default=None,
                   help="also write the age-and-sex reference (logistic regression on age and sex, fit on the "
                        "train split's new-onset boundaries) on the same rows to this predictions folder")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="windows per forward pass (default 32)")
    _add_inference_options(p)
    p.set_defaults(func=_handler("nextvisit.predict.occurrence:occurrence_cli"))


def _add_oracle(verbs) -> None:
    p = verbs.add_parser(
        "oracle",
        help="the simulator's true risk for labels, in the predictions schema (the ceiling)",
        description="Write the simulator's ground-truth risk for every label row (only for `nextvisit simulate` data).",
    )
    p.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="a dataset written by `nextvisit simulate`")
    p.add_argument("labels", type=Path, metavar="LABELS", help="labels folder")
    p.add_argument("--out", type=Path, required=True, help="predictions folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--samples", type=_positive_int, default=128,
                   help="Monte Carlo futures per prediction (default 128; standard error sqrt(p(1-p)/samples))")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="worker processes (default: CPU count, at most one per 200 subject-times to score)")
    p.set_defaults(func=_handler("nextvisit.baselines.oracle:run_cli"))


def _add_baseline(verbs) -> None:
    p = verbs.add_parser("baseline", help="baselines on identical cohorts (masked transformer, count features)",
                         description="Baselines that write the same predictions schema as `forecast`.")
    baselines = p.add_subparsers(dest="baseline", metavar="BASELINE", parser_class=_Parser, required=True)
    masked = baselines.add_parser("masked", help="BERT-style masked transformer: pretrain, then fine-tune per task")
    masked_verbs = masked.add_subparsers(dest="stage", metavar="STAGE", parser_class=_Parser, required=True)
    q = masked_verbs.add_parser("pretrain", help="masked-token pretraining on a token store")
    q.add_argument("store", type=Path, metavar="STORE", help="token store folder")
    q.add_argument("--out", type=Path, required=True, help="run folder")
    q.add_argument("--preset", default="tiny", help="tiny, small or paper (12 x 768)")
    q.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes (default: the preset's; tiny 0.75)")
    q.add_argument("--max-steps", type=_positive_int, default=None,
                   help="train this many optimizer steps instead of the preset's time budget (unless --max-minutes "
                        "is given too): the same seed and thread count (the tiny preset pins 1) then give the same "
                        "run on any machine")
    q.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    q.add_argument("--config", type=Path, default=None, help="YAML overriding preset fields (docs/baselines.md)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.set_defaults(func=_handler("nextvisit.baselines.masked:pretrain_cli"))
    q = masked_verbs.add_parser("finetune", help="fine-tune on train labels, early-stop on tuning, predict held_out")
    q.add_argument("run", type=Path, metavar="RUN", help="masked pretraining run")
    q.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset the labels refer to")
    q.add_argument("labels", type=Path, metavar="LABELS", help="labels folder from `nextvisit label`")
    q.add_argument("--out", type=Path, required=True, help="fine-tuned run folder; predictions inside")
    q.add_argument("--max-minutes", type=float, default=None,
                   help="time budget of the whole command (tokenize, train, predict); default: the run's preset")
    q.add_argument("--max-steps", type=_positive_int, default=None,
                   help="optimizer steps per run at most (the fold run; the refit stops at the step it chose), "
                        "instead of the preset's time budget (unless --max-minutes is given too): the same seed "
                        "and thread count (the tiny preset pins 1) then give the same predictions on any machine")
    q.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    q.add_argument("--config", type=Path, default=None, help="YAML overriding fine-tuning fields (docs/baselines.md)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.set_defaults(func=_handler("nextvisit.baselines.masked:finetune_cli"))
    q = baselines.add_parser("counts", help="bag-of-codes counts in lookback windows + age/sex, logistic regression")
    q.add_argument("meds_dir", type=Path, metavar="MEDS_DIR", help="MEDS dataset the labels refer to")
    q.add_argument("labels", type=Path, metavar="LABELS", help="labels folder from `nextvisit label`")
    q.add_argument("--out", type=Path, required=True, help="predictions folder")
    q.add_argument("--model", default=None, choices=["logistic", "gbt"],
                   help="classifier (default: the --config file's model, else logistic)")
    q.add_argument("--observable", dest="features", action="store_const", const="observable", default=None,
                   help="the observable reference: counts plus time since each code's first visit "
                        "(kind observable-reference; default: the --config file's features, else counts)")
    q.add_argument("--config", type=Path, default=None, help="YAML overriding count-model fields (docs/baselines.md)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.set_defaults(func=_handler("nextvisit.baselines.counts:run_cli"))


def _add_evaluate(verbs) -> None:
    p = verbs.add_parser(
        "evaluate",
        help="metrics with bootstrap CIs, inflation analysis, HTML report",
        description=(
            "Evaluate one or more prediction folders: AUROC/AUPRC with 95% bootstrap CIs, F1 at the tuning "
            "split's best threshold, Brier and calibration, age-sex-stratified AUROC, share of the oracle's margin."
        ),
    )
    p.add_argument("predictions", type=Path, nargs="+", metavar="PREDICTIONS", help="prediction folders or files")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0,
                   help="bootstrap seed (default 0); the same seed gives the same numbers")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty report folder")
    p.set_defaults(func=_handler("nextvisit.evaluate.evaluation:run_cli"))


def _add_export_meds_eval(verbs) -> None:
    p = verbs.add_parser(
        "export-meds-eval",
        help="write predictions as files meds-evaluation accepts (one per task, horizon and split)",
        description=(
            "Split a predictions folder into one parquet per task, horizon and split in meds-evaluation's "
            "prediction schema (subject_id, prediction_time, boolean_value, predicted_boolean_value, "
            "predicted_boolean_probability; no other column), plus manifest.json saying what each file holds "
            "and how many rows were skipped and why (unlabelled, missing score). Score a file with "
            "`meds-evaluation-cli predictions_path=FILE output_file=RESULTS.json` (pip install meds-evaluation; "
            "not needed to export). Layout: docs/interfaces.md §6."
        ),
    )
    p.add_argument("predictions", type=Path, metavar="PRED", help="a predictions folder (or its predictions.parquet)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (DIR/<task>/<horizon>d/<split>.parquet)")
    p.add_argument("--split", default="held_out",
                   help="split to export (default held_out), or several separated by commas, e.g. tuning,held_out; "
                        "each gets its own files, since meds-evaluation scores a file as one set")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_handler("nextvisit.artifacts.meds_evaluation:run_cli"))


def _add_medsdev(verbs) -> None:
    p = verbs.add_parser(
        "medsdev",
        help="run as a MEDS-DEV model: the stages of its model.yaml",
        description=(
            "The commands of nextvisit's MEDS-DEV model.yaml (src/nextvisit/medsdev/model.yaml), one per MEDS-DEV "
            "stage, with MEDS-DEV's folders as options: unsupervised-train (tokenize, pretrain), supervised-train "
            "(zero-shot: fits nothing, copies the pretrained run), predict (horizon query on the label rows of a "
            "split, in meds-evaluation's schema); model-dir writes the folder to add to MEDS-DEV. An empty option "
            "value means not given, so model.yaml can pass unset environment variables. docs/meds-dev.md."
        ),
    )
    stages = p.add_subparsers(dest="stage", metavar="STAGE", parser_class=_Parser, required=True)
    device = {"type": _or_none(_device), "default": None, "help": "cpu, cuda or cuda:N (default: cuda when available)"}

    q = stages.add_parser("unsupervised-train", help="tokenize the dataset and pretrain the next-visit model",
                          description="OUT/store: the token store (vocabulary fit on train); OUT/run: the model "
                                      "pretrained on train; OUT/nextvisit.json: what was done.")
    q.add_argument("--dataset-dir", type=Path, required=True, help="MEDS dataset ({dataset_dir})")
    q.add_argument("--output-dir", type=Path, required=True, help="this stage's folder ({output_dir})")
    q.add_argument("--demo", type=_flag, default=False,
                   help=f"True: preset tiny and a few steps (MEDS-DEV's {{demo}}; default False)")
    q.add_argument("--preset", type=_or_none(str), default=None, help="tiny (default), small or paper")
    q.add_argument("--pretrain-config", type=_or_none(Path), default=None,
                   help="YAML overriding preset fields (docs/model.md)")
    q.add_argument("--tokenizer-config", type=_or_none(Path), default=None,
                   help="tokenizer YAML (docs/tokenizer.md; default: the defaults with max_time: null, as MEDS-DEV's "
                        "datasets have shifted dates)")
    q.add_argument("--max-steps", type=_or_none(_positive_int), default=None,
                   help="optimizer steps (default: the preset's; a demo's: a few)")
    q.add_argument("--max-minutes", type=_or_none(float), default=None, help="time limit of pretraining")
    q.add_argument("--device", **device)
    q.set_defaults(func=_handler("nextvisit.medsdev.stages:unsupervised_train_cli"))

    q = stages.add_parser("supervised-train", help="zero-shot: fit nothing, copy the pretrained run",
                          description="Reads no label. Copies MODEL_INITIALIZATION_DIR/run (without checkpoint/) to "
                                      "OUT/run, where the predict stage finds it, and writes OUT/nextvisit.json.")
    q.add_argument("--model-initialization-dir", type=Path, required=True,
                   help="the unsupervised train stage's folder ({model_initialization_dir})")
    q.add_argument("--output-dir", type=Path, required=True, help="this stage's folder ({output_dir})")
    q.set_defaults(func=_handler("nextvisit.medsdev.stages:supervised_train_cli"))

    q = stages.add_parser("predict", help="score MEDS label rows of a split by the horizon query",
                          description="Writes OUT/predictions.parquet (subject_id, prediction_time, boolean_value, "
                                      "predicted_boolean_value (null), predicted_boolean_probability) for every "
                                      "labelled row of the split, and OUT/nextvisit.json (every label row read, by "
                                      "what became of it).")
    q.add_argument("--dataset-dir", type=Path, required=True, help="MEDS dataset ({dataset_dir})")
    q.add_argument("--labels-dir", type=Path, required=True,
                   help="MEDS label files, *.parquet at any depth ({labels_dir})")
    q.add_argument("--model-initialization-dir", type=Path, required=True,
                   help="a train stage's folder holding run/, or a run folder ({model_initialization_dir})")
    q.add_argument("--output-dir", type=Path, required=True, help="this stage's folder ({output_dir})")
    q.add_argument("--split", default="held_out", help="split to predict ({split}; default held_out)")
    q.add_argument("--task", type=_or_none(str), default=None,
                   help="built-in task or task YAML whose condition is scored (NEXTVISIT_TASK)")
    q.add_argument("--condition-codes", type=_or_none(str), default=None,
                   help="comma-separated code prefixes of the condition, instead of --task (NEXTVISIT_CONDITION_CODES)")
    q.add_argument("--horizon-days", type=_or_none(_positive_int), default=None,
                   help="horizon of the query in days (NEXTVISIT_HORIZON_DAYS; default: the task's only horizon)")
    q.add_argument("--device", **device)
    q.set_defaults(func=_handler("nextvisit.medsdev.stages:predict_cli"))

    q = stages.add_parser("model-dir", help="write the model folder to add to MEDS-DEV",
                          description="OUT/model.yaml, OUT/README.md and OUT/requirements.txt: copy OUT to MEDS-DEV's "
                                      "src/MEDS_DEV/models/nextvisit/ (docs/meds-dev.md).")
    q.add_argument("out", type=Path, metavar="OUT", help="folder to write")
    q.add_argument("--requirement", required=True,
                   help="the pip requirement that installs nextvisit in MEDS-DEV's model environment, e.g. "
                        "'nextvisit @ file:///path/to/nextvisit'")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.set_defaults(func=_handler("nextvisit.medsdev.stages:model_dir_cli"))


def _add_demo(verbs) -> None:
    p = verbs.add_parser(
        "demo",
        help="run the whole chain on the embedded synthetic health system",
        description="Simulate, tokenize, pretrain (tiny), label, forecast, baselines, evaluate; print the headline table.",
    )
    p.add_argument("--out", type=Path, default=Path("nextvisit-demo"), help="working folder (default ./nextvisit-demo)")
    p.add_argument("--subjects", type=_positive_int, default=None,
                   help="cohort size (default 20,000; 1,500 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation and the bootstrap (default 0)")
    p.add_argument("--quick", action="store_true", help="a much smaller, faster run (for smoke tests)")
    p.set_defaults(func=_handler("nextvisit.demo:run_cli"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nextvisit",
        description=(
            "Pretrain a next-visit foundation model on structured EHR (MEDS), forecast disease incidence "
            "zero-shot, and evaluate it honestly against baselines. Stages talk through files: "
            "simulate/MEDS -> tokenize -> pretrain -> label -> forecast -> evaluate. "
            "`nextvisit demo` runs the whole chain on the embedded synthetic health system."
        ),
    )
    from nextvisit import __version__

    parser.add_argument("--version", action="version", version=f"nextvisit {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    parser.set_defaults(func=None)
    _add_simulate(verbs)
    _add_convert(verbs)
    _add_tokenize(verbs)
    _add_inspect(verbs)
    _add_pretrain(verbs)
    _add_label(verbs)
    _add_forecast(verbs)
    _add_sample(verbs)
    _add_occurrence(verbs)
    _add_oracle(verbs)
    _add_baseline(verbs)
    _add_evaluate(verbs)
    _add_export_meds_eval(verbs)
    _add_export_aces(verbs)
    _add_medsdev(verbs)
    _add_demo(verbs)
    return parser


def _clear_progress_bars() -> None:
    """Close the progress bars a failed command left open, wiping them from the terminal, so that its error is
    the one line left (tqdm is only looked at when a stage has imported it)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.leave = False
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        parser.print_help()
        return 2
    from nextvisit.artifacts.folders import release_all

    try:
        result = args.func(args)
    except UserError as exc:
        _clear_progress_bars()
        sys.stderr.write(f"nextvisit {args.verb}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        release_all()  # the output-folder locks a failed stage still holds (a finished one has released its own)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
