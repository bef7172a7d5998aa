"""`nextvisit demo`: the whole chain on the embedded synthetic health system, with no arguments.

simulate -> tokenize -> pretrain (tiny, with and without repeat regularization) -> label (dementia, knee OA at
2 and 5 years) -> forecast (zero-shot) + oracle + observable reference + baselines -> next-visit occurrence
(inflation analysis, beside an age-and-sex reference) -> evaluate. Every stage is the same command a user would run by hand; the demo prints each command line so
it can be repeated stage by stage.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nextvisit.errors import UserError


DEMO_MARKER = ".nextvisit-demo"


@dataclass
class DemoConfig:
    subjects: int = 20_000
    seed: int = 0
    # Both next-visit models (with and without repeat regularization) train for the same number of steps,
    # so the demo's figures do not depend on how busy the machine is.
    # The cosine learning-rate decay spans the run (the preset's longer schedule suits longer runs).
    pretrain_steps: int = 600
    decay_steps: int = 550
    pretrain_minutes: float = 3.0  # a safety limit per model on a slow machine, not the planned length
    # A fixed CPU thread count: a CPU run repeats bit for bit only at the same count (docs/scale.md,
    # "Reproducibility"), so the same seed gives the same figures on any machine. One, not 2: on 2 quiet cores
    # 2 threads were 1.4x faster (60 steps on the demo's store: 7.4 s against 9.3 s, setup included), but while
    # another job held a core they spun at 3.3 s a step, which would run into the safety limit above.
    pretrain_threads: int = 1
    # The masked baseline by steps, not by its preset's time budgets, for the same reason: 300 pretraining steps
    # (what its 0.75-minute budget gave on 2 quiet cores, about 45 s) and at most 300 steps per fine-tuning run (the
    # fold run, then the refit stopped at the step it chose: what a 1-minute budget gave, docs/baselines.md).
    masked_pretrain_steps: int = 300
    masked_finetune_steps: int = 300
    # Horizon queries (on in the presets) pay off with more training: +0.05 to +0.15 AUROC at 2,200 steps on the
    # quality benchmark, but no measurable change at 600 (docs/model.md, "Zero-shot levers: measured"). So the demo
    # trains without them and its figures stay those of the README; `nextvisit pretrain --preset tiny` has them.
    horizon_queries: bool = False
    # The tiny preset's forecasts read 255 history tokens since the quality benchmark measured it on a run with horizon
    # queries (docs/model.md); the demo's run without them keeps the 127 its README figures were measured with.
    query_max_tokens: int = 127
    # The tiny preset is 96 wide x 2 layers at lr 4e-3 since the quality benchmark measured it at its 8-minute budget
    # (docs/model.md); the demo keeps the 128 x 3 model at lr 2e-3 its 600 steps and README figures were measured with.
    d_model: int = 128
    n_layers: int = 3
    lr: float = 2e-3
    min_lr: float = 2e-4
    tasks: tuple[str, ...] = ("dementia", "knee_oa")
    bootstrap: int = 1000
    oracle_samples: int = 64  # Monte Carlo futures per oracle prediction (SE <= 0.0625)
    occurrence_cohort: str = "eligible"  # the inflation analysis's boundaries (nextvisit occurrence --cohort)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        """A smoke-test size: minutes become seconds; figures are not meaningful."""
        return cls(subjects=1500, seed=seed, pretrain_steps=40, decay_steps=30,
                   masked_pretrain_steps=20, masked_finetune_steps=20, bootstrap=200,
                   oracle_samples=16)


class _Stages:
    def __init__(self):
        self.started = time.perf_counter()
        self.timings: list[tuple[str, float]] = []
        self.total = 0

    def run(self, title: str, argv: list[str]) -> None:
        from nextvisit.cli import main as cli_main

        self.total += 1
        line = "nextvisit " + " ".join(shlex.quote(str(a)) for a in argv)
        print(f"\n== [{self.total}] {title}\n   $ {line}", flush=True)
        t0 = time.perf_counter()
        code = cli_main([str(a) for a in argv])
        elapsed = time.perf_counter() - t0
        self.timings.append((title, elapsed))
        if code:
            raise UserError(f"demo stage '{title}' failed (exit {code}); rerun it alone with: {line}")
        print(f"   done in {elapsed:.1f} s", flush=True)


def _warn_if_stopped_early(run: Path, config: DemoConfig) -> None:
    """The safety limit stops a run at whatever step the machine reached: say so, since such figures do not
    repeat."""
    from nextvisit.train.checkpoint import checkpoint_step

    step = checkpoint_step(run)
    if step != config.pretrain_steps:
        print(f"   warning: {run.name} stopped at step {step} of {config.pretrain_steps} (the safety limit of "
              f"{config.pretrain_minutes:g} minutes): this machine is slower or busier than planned, and the "
              "figures of a run cut by the clock differ from run to run", flush=True)


def run_demo(out: Path, config: DemoConfig) -> Path:
    out = Path(out)
    marker = out / DEMO_MARKER
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise UserError(f"{out}: exists and is not a folder made by `nextvisit demo`; choose another --out")
        # A folder the demo made is its own scratch space: a rerun starts afresh.
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `nextvisit demo`; a rerun replaces this whole folder\n")
    meds, store = out / "meds", out / "store"
    # The run folder names become the model names in the report.
    run, run_plain = out / "nextvisit", out / "nextvisit_no_repeat_reg"
    stages = _Stages()

    stages.run(f"simulate {config.subjects:,} subjects", ["simulate", "--subjects", config.subjects, "--seed", config.seed, "--out", meds])
    stages.run("tokenize (vocabulary and lab statistics from train only)", ["tokenize", meds, "--out", store])
    schedule = (f"train:\n  max_steps: {config.pretrain_steps}\n  decay_steps: {config.decay_steps}\n"
                f"  threads: {config.pretrain_threads}\n  lr: {config.lr}\n  min_lr: {config.min_lr}\n"
                f"model:\n  horizon_queries: {str(config.horizon_queries).lower()}\n"
                f"  d_model: {config.d_model}\n  n_layers: {config.n_layers}\n"
                f"data:\n  query_max_tokens: {config.query_max_tokens}\n")
    (out / "pretrain.yaml").write_text(schedule)
    stages.run(f"pretrain next-visit model, preset tiny ({config.pretrain_steps} steps)",
               ["pretrain", store, "--out", run, "--preset", "tiny", "--config", out / "pretrain.yaml",
                "--max-minutes", config.pretrain_minutes])
    _warn_if_stopped_early(run, config)
    (out / "pretrain_no_repeat_reg.yaml").write_text(schedule + "loss:\n  repeat_decay: 1.0\n")
    stages.run(f"pretrain the same model without repeat regularization ({config.pretrain_steps} steps)",
               ["pretrain", store, "--out", run_plain, "--preset", "tiny", "--config", out / "pretrain_no_repeat_reg.yaml",
                "--max-minutes", config.pretrain_minutes])
    _warn_if_stopped_early(run_plain, config)
    stages.run(f"masked-transformer baseline: pretrain ({config.masked_pretrain_steps} steps)",
               ["baseline", "masked", "pretrain", store, "--out", out / "masked", "--preset", "tiny",
                "--max-steps", config.masked_pretrain_steps])

    predictions: list[Path] = []
    for task in config.tasks:
        labels = out / "labels" / task
        stages.run(f"label {task}", ["label", meds, task, "--out", labels])
        pred = out / "predictions" / task
        stages.run(f"zero-shot forecast {task}", ["forecast", run, meds, labels, "--out", pred / "nextvisit"])
        stages.run(f"oracle risk {task}", ["oracle", meds, labels, "--out", pred / "oracle", "--samples", config.oracle_samples])
        stages.run(f"count-feature baseline {task}", ["baseline", "counts", meds, labels, "--out", pred / "counts"])
        stages.run(f"observable reference {task} (all history, age, sex, time since each code's first occurrence)",
                   ["baseline", "counts", meds, labels, "--out", pred / "observable_reference", "--observable"])
        stages.run(f"masked-transformer baseline: fine-tune {task}",
                   ["baseline", "masked", "finetune", out / "masked", meds, labels, "--out", pred / "masked",
                    "--max-steps", config.masked_finetune_steps])
        predictions += [pred / "nextvisit", pred / "oracle", pred / "observable_reference", pred / "counts",
                        pred / "masked"]
        for name, model_run in (("nextvisit", run), ("nextvisit_no_repeat_reg", run_plain)):
            occ = out / "predictions" / f"{task}_next_visit" / name
            # held_out only: the inflation analysis compares AUROCs, which need no tuning-split threshold.
            # The task's age and history rules (--cohort eligible): at the demo's size the task's 10% landmark
            # sampling would leave a handful of next-visit onsets. The first run also writes the age-and-sex
            # reference on the same rows.
            reference = out / "predictions" / f"{task}_next_visit" / "age_sex_reference"
            extra = ["--reference-out", reference] if name == "nextvisit" else []
            stages.run(f"next-visit occurrence {task} ({name})",
                       ["occurrence", model_run, store, task, "--out", occ, "--splits", "held_out",
                        "--cohort", config.occurrence_cohort, *extra])
            predictions += [occ, *([reference] if extra else [])]

    report = out / "report"
    stages.run("evaluate", ["evaluate", *predictions, "--out", report, "--bootstrap", config.bootstrap, "--seed", config.seed])
    total = time.perf_counter() - stages.started
    print("\nStage timings:")
    for title, seconds in stages.timings:
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total")
    print(f"\nReport: {(report / 'report.html').resolve()}")
    return report


def run_cli(args) -> int:
    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    if args.subjects:
        config.subjects = args.subjects
    run_demo(args.out, config)
    return 0


if __name__ == "__main__":
    from nextvisit.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
