"""Monte Carlo trajectories (``nextvisit sample``) and the visit-time head they need: the hazard's law, the head
sees nothing of the next visit's date, the KV cache equals recomputation, untruncated code draws, seeds per
trajectory, no event after the prediction time, undecided trajectories counted, and the trajectory files labelled
by meds-trajectory-evaluation with an ACES task agree with our own estimate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from nextvisit.cli import main
from nextvisit.config import ModelConfig, preset
from nextvisit.model.sequence import query_batch, window_arrays, windows_batch, Window
from nextvisit.model.transformer import NextVisitModel
from nextvisit.model.visit_time import bin_of, bin_probabilities, cdf_at, edges_tensor, gap_nll, sample_gaps
from nextvisit.predict.sample import (
    History, SampleConfig, Sampler, Trajectory, sample, trajectory_seed,
)
from nextvisit.tasks import LabelResult, make_labels, write_labels
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.store import SEP, Subject
from nextvisit.tokenize.tokenizer import Tokenizer
from test_forecast import SPLITS, TASK, cohort_rows
from test_tasks import write_meds

EDGES = edges_tensor(ModelConfig().visit_time_edges)


# -- the hazard ------------------------------------------------------------------------------------------------


def test_gap_nll_is_the_hazard_likelihood():
    torch.manual_seed(0)
    logits = torch.randn(5, len(EDGES), dtype=torch.float64)
    gaps = torch.tensor([1, 3, 11, 700, 9000])
    nll = gap_nll(logits, gaps, EDGES)
    h = torch.sigmoid(logits)
    for i, g in enumerate(gaps.tolist()):
        b = int(np.searchsorted(EDGES.numpy(), g, side="left"))
        expected = -sum(math.log(1 - h[i, k]) for k in range(b)) - (math.log(h[i, b]) if b < len(EDGES) else 0.0)
        assert float(nll[i]) == pytest.approx(expected, rel=1e-5)
    # a censored gap: only the bins wholly at or below it survived
    censored = gap_nll(logits, torch.tensor([10, 10, 10, 10, 10]), EDGES, censored=torch.ones(5, dtype=torch.bool))
    whole = int(np.searchsorted(EDGES.numpy(), 10, side="right"))
    assert float(censored[0]) == pytest.approx(-sum(math.log(1 - h[0, k]) for k in range(whole)), rel=1e-5)
    # censored inside a bin (days 8..10): the bins before it, then 2 of its 3 days under the uniform law
    inside = gap_nll(logits, torch.full((5,), 9), EDGES, censored=torch.ones(5, dtype=torch.bool))
    expected = -sum(math.log(1 - h[0, k]) for k in range(7)) - math.log(1 - h[0, 7] * 2 / 3)
    assert float(inside[0]) == pytest.approx(expected, rel=1e-5)
    assert float(inside[0]) == pytest.approx(-math.log(1 - float(cdf_at(logits[:1], torch.tensor([9]), EDGES))), rel=1e-5)
    # the bin probabilities, open bin included, sum to one; the CDF at the last edge is everything but the open bin
    probs = bin_probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(cdf_at(logits, EDGES[-1:], EDGES)[:, 0], 1 - probs[:, -1])


def test_the_head_starts_at_the_gaps_constant_law():
    """The starting bias: hazards whose bin probabilities are the observed bin shares (the open bin included)."""
    from nextvisit.model.visit_time import constant_hazard_logits, gap_bin_counts

    gaps = np.random.default_rng(0).integers(1, 5000, 2000)
    logits = torch.from_numpy(constant_hazard_logits(gap_bin_counts(gaps, EDGES.tolist())))[None]
    shares = np.bincount(np.searchsorted(EDGES.numpy(), gaps, side="left"), minlength=len(EDGES) + 1) / len(gaps)
    assert np.allclose(bin_probabilities(logits)[0].numpy(), shares, atol=2e-3)


def test_sampled_gaps_follow_the_hazard_and_respect_the_minimum():
    rng = np.random.default_rng(0)
    logits = torch.full((1, len(EDGES)), -2.0, dtype=torch.float64)
    n = 40_000
    gaps = sample_gaps(logits.expand(n, -1), EDGES, torch.ones(n, dtype=torch.long),
                       torch.from_numpy(rng.random((n, 2))))
    expected = bin_probabilities(logits)[0].numpy()
    bins = bin_of(torch.where(gaps > 0, gaps, torch.full_like(gaps, 10**6)), EDGES).numpy()
    observed = np.bincount(bins, minlength=len(EDGES) + 1) / n
    assert np.all(np.abs(observed - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-4)
    # conditioned on no visit before day 100: never earlier, and the law is the hazard's restricted to >= 100
    conditioned = sample_gaps(logits.expand(n, -1), EDGES, torch.full((n,), 100), torch.from_numpy(rng.random((n, 2))))
    finite = conditioned[conditioned > 0]
    assert int(finite.min()) >= 100
    cdf = cdf_at(logits, torch.tensor([99, 365]), EDGES)[0].numpy()
    share = (cdf[1] - cdf[0]) / (1 - cdf[0])  # P(gap <= 365 | gap >= 100)
    assert abs(float(((conditioned > 0) & (conditioned <= 365)).double().mean()) - share) < 0.02


# -- the model ----------------------------------------------------------------------------------------------------


def _model(vocab_size: int, seed: int = 0, dtype=torch.float64) -> NextVisitModel:
    config = preset("tiny").model
    config.d_model, config.n_layers, config.n_heads, config.vocab_size = 32, 2, 2, vocab_size
    torch.manual_seed(seed)
    model = NextVisitModel(config).to(dtype).eval()
    with torch.no_grad():
        model.output_bias.normal_(0, 1)
        model.visit_time.bias.normal_(0, 1)
    return model


def _subject(n_visits=6, vocab=40, seed=0) -> Subject:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, n_visits)
    days = np.cumsum(rng.integers(1, 90, n_visits)).astype(np.int32) + 10_000
    return Subject(subject_id=1, birth_day=0, visit_days=days,
                   visit_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   tokens=rng.integers(8, vocab, int(lengths.sum())).astype(np.int32))


@torch.no_grad()
def test_extend_equals_the_full_forward():
    """Encoding a window piece by piece into the KV cache (history, then a SEP, then a visit) gives the hidden
    states of one forward over the whole sequence."""
    model = _model(40)
    subject = _subject()
    tokens, days, att = window_arrays(subject, 0, 128)
    n_hist = int(np.diff(subject.visit_offsets)[:-1].sum()) + subject.n_visits - 1  # all but the last visit
    full = model.hidden_states(torch.from_numpy(tokens)[None], torch.from_numpy(days).double()[None],
                               torch.from_numpy(att)[None], torch.ones(1, len(tokens), dtype=torch.long))[0]
    cache = model.new_cache(1, 64, "cpu", torch.float64)
    pieces = [(0, n_hist - 1), (n_hist - 1, n_hist), (n_hist, len(tokens))]  # history, its last SEP, the last visit
    outputs = []
    for a, b in pieces:
        t = lambda x: torch.from_numpy(x[a:b])[None]
        outputs.append(model.extend(cache, t(tokens), t(days).double(), t(att), torch.tensor([b - a]))[0])
    assert torch.allclose(torch.cat(outputs), full, atol=1e-10)
    assert int(cache.length[0]) == len(tokens)


@torch.no_grad()
def test_visit_time_head_sees_nothing_of_the_next_visit_date():
    """The head reads the last token of a visit, which must not see the SEP after it (whose rotary day is the next
    visit's). Moving the next visit changes the SEP's own output, so the check can fail: reading the head at the SEP
    (the mutation) would leak the answer."""
    model = _model(40)
    subject = _subject()
    moved = Subject(**{**subject.__dict__, "visit_days": subject.visit_days.copy()})
    moved.visit_days[3:] += 200  # the visit after visit 2 happens 200 days later
    supervised = np.ones(40, bool)

    def outputs(s):
        batch = windows_batch([s], [Window(0, 0, s.n_visits)], supervised, 128)
        sep_hidden, time_logits = model(batch.tokens, batch.days.double(), batch.att_days, batch.doc_ids,
                                        batch.positions, head=False, time_positions=batch.time_positions)
        return sep_hidden, time_logits, batch

    sep_a, time_a, batch = outputs(subject)
    sep_b, time_b, _ = outputs(moved)
    assert batch.time_gaps.tolist() == np.diff(subject.visit_days).tolist()
    assert torch.allclose(time_a[2], time_b[2], atol=1e-12)  # the head after visit 2: unchanged
    assert not torch.allclose(sep_a[2], sep_b[2], atol=1e-6)  # the SEP after visit 2 does see the date


def test_visit_time_head_trains_jointly_and_reports_its_loss_and_calibration(tmp_path):
    """Pretraining with the head: its loss in metrics.csv (train and validation), near the best constant law of
    the store's gaps (the entropy of their bins) and far below the untrained head's, and its calibration file."""
    from test_train import make_store, read_metrics, tiny_config
    from nextvisit.tokenize.store import TokenStore
    from nextvisit.train.trainer import train

    store = make_store(tmp_path / "store")
    config = tiny_config(max_steps=150, eval_every=150, eval_contexts=0, checkpoint_every=1000, log_every=10,
                         warmup_steps=10, decay_steps=140)
    last = train(store, tmp_path / "run", config, progress=False)
    rows = read_metrics(tmp_path / "run")
    assert all(r["visit_time_loss"] for r in rows if r["loss"])
    split = TokenStore(store).split("tuning")
    days = np.asarray(split.visit_days, np.int64)
    starts = np.asarray(split.subject_visits)
    gaps = np.concatenate([np.diff(days[a:b]) for a, b in zip(starts[:-1], starts[1:])])
    shares = np.bincount(bin_of(torch.from_numpy(gaps), EDGES).numpy()) / len(gaps)
    entropy = float(-(shares[shares > 0] * np.log(shares[shares > 0])).sum())
    untrained = float(gap_nll(torch.zeros(len(gaps), len(EDGES)), torch.from_numpy(gaps), EDGES).mean())
    val = float(last["val_visit_time_loss"])
    assert val < entropy + 0.1 < untrained - 1.0, (val, entropy, untrained)
    calibration = json.loads((tmp_path / "run" / "visit_time_calibration.json").read_text())
    assert calibration["visits"] == len(gaps) and calibration["split"] == "tuning"
    observed = [float(np.mean(gaps <= d)) for d in calibration["days"]]
    assert np.allclose(calibration["observed_share"], observed, atol=1e-5)
    assert np.max(np.abs(np.subtract(calibration["predicted_share"], observed))) < 0.1


# -- sampling: a run whose probabilities are known ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    meds = write_meds(root / "meds", [cohort_rows()], SPLITS)
    tokenizer = Tokenizer.fit(pl.read_parquet(meds / "data"), TokenizerConfig(min_count=1, max_time=None))
    labels, few = root / "labels", root / "few_labels"
    result = make_labels(meds, TASK, progress=False)
    write_labels(labels, result, TASK)
    # a handful of held_out histories, for the tests that sample several times
    chosen = result.labels.filter(pl.col("split") == "held_out")["subject_id"].unique().sort()[:4]
    write_labels(few, LabelResult(result.labels.filter(pl.col("subject_id").is_in(chosen.implode())), result.counts),
                 TASK)
    return {"root": root, "meds": meds, "tokenizer": tokenizer, "labels": labels, "few": few,
            "run": rolling_run(root / "run", tokenizer)}


def rolling_run(folder: Path, tokenizer: Tokenizer, head: bool = True, query_max_tokens: int = 31,
                recurrence: bool = False) -> Path:
    """A random-init run that rolls realistic-length trajectories: death made rare (a random head gives every
    token probability ~0.5), the condition's codes uncommon (about 2% per visit), and the next visit 61-90 days
    on (all hazard on that bin), so 5 years take about two dozen visits and the 32-token window slides."""
    folder.mkdir(parents=True)
    config = preset("tiny")
    config.model.d_model, config.model.n_layers, config.model.n_heads = 32, 2, 2
    config.model.vocab_size = len(tokenizer.vocab)
    config.model.visit_time_head = head
    config.model.recurrence_embedding = recurrence
    config.data.query_max_tokens = query_max_tokens
    config.loss.kind = "bce"  # its logits are then the log-odds the sampler draws with (losses.implied_probability)
    torch.manual_seed(0)
    model = NextVisitModel(config.model)
    with torch.no_grad():
        model.output_bias.zero_()
        model.output_bias[tokenizer.vocab.id("MEDS_DEATH")] = -30.0
        model.output_bias[torch.from_numpy(TASK.condition.token_ids(tokenizer.vocab))] = -4.0
        if head:
            edges = list(config.model.visit_time_edges)
            model.visit_time.weight.zero_()
            model.visit_time.bias.fill_(-30.0)
            model.visit_time.bias[edges.index(90)] = 30.0
    config.save(folder / "config.yaml")
    tokenizer.save(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _trajectories(folder: Path, n: int) -> list[pl.DataFrame]:
    return [pl.read_parquet(folder / "trajectories" / f"{s}.parquet") for s in range(n)]


def test_kv_cache_equals_recomputation_and_seeds_are_per_trajectory(world, tmp_path):
    """The same trajectories with the KV cache, without it (the window re-encoded at every step), and with the
    cache in batches of one trajectory (so a trajectory does not depend on what else is in its batch)."""
    args = dict(samples=3, precision="fp32", splits=("held_out",))
    few = world["few"]
    cached = sample(world["run"], world["meds"], few, tmp_path / "a", SampleConfig(**args), "cpu", progress=False)
    sample(world["run"], world["meds"], few, tmp_path / "b", SampleConfig(**args, cache=False), "cpu", progress=False)
    sample(world["run"], world["meds"], few, tmp_path / "c", SampleConfig(**args, batch_size=1), "cpu", progress=False)
    assert cached["context_slides"] > 0 and cached["generated_visits"] > 10 * cached["trajectories"]
    assert cached["ended"]["horizon"] == cached["trajectories"]
    for other in ("b", "c"):
        for x, y in zip(_trajectories(tmp_path / "a", 3), _trajectories(tmp_path / other, 3)):
            assert x.height > 0 and x.equals(y)
        for estimator in ("monte_carlo", "rao_blackwell"):
            p = pl.read_parquet(tmp_path / "a" / estimator / "predictions.parquet")
            q = pl.read_parquet(tmp_path / other / estimator / "predictions.parquet")
            risk = "predicted_boolean_probability"
            assert p.drop("model", risk).equals(q.drop("model", risk))
            # the same draws; the model's onset probabilities summed by rao_blackwell agree up to float rounding
            assert np.allclose(p[risk].to_numpy(), q[risk].to_numpy(), rtol=0, atol=1e-5)
            if estimator == "monte_carlo":
                assert p[risk].equals(q[risk])
    # another seed, other trajectories
    sample(world["run"], world["meds"], few, tmp_path / "d", SampleConfig(**args, seed=1), "cpu", progress=False)
    assert not _trajectories(tmp_path / "a", 1)[0].equals(_trajectories(tmp_path / "d", 1)[0])


def test_trajectories_start_after_the_prediction_time_and_files_follow_the_schema(world, tmp_path):
    sample(world["run"], world["meds"], world["labels"], tmp_path / "t", SampleConfig(samples=2, precision="fp32"),
           "cpu", progress=False)
    from MEDS_trajectory_evaluation.schema import GeneratedTrajectorySchema

    for frame in _trajectories(tmp_path / "t", 2):
        assert frame.columns == ["subject_id", "time", "code", "numeric_value", "text_value", "prediction_time"]
        assert frame.filter(pl.col("time") <= pl.col("prediction_time")).height == 0
        GeneratedTrajectorySchema.align(frame.to_arrow())  # raises when the schema does not hold
        assert frame.equals(frame.sort("subject_id", "prediction_time", "time", maintain_order=True))
    info = json.loads((tmp_path / "t" / "sampling.json").read_text())
    assert sum(info["ended"].values()) == info["trajectories"] == 2 * info["histories"]


def test_no_event_after_the_prediction_time_reaches_the_sampler(world, tmp_path):
    """Events added after each subject's last prediction time (the condition itself among them) change nothing."""
    data = pl.read_parquet(world["meds"] / "data")
    labels = pl.read_parquet(world["labels"] / "labels.parquet") if (world["labels"] / "labels.parquet").exists() \
        else pl.read_parquet(next(world["labels"].rglob("*.parquet")))
    last = labels.group_by("subject_id").agg(pl.col("prediction_time").max().alias("t"))
    future = last.select(
        "subject_id", (pl.col("t") + timedelta(days=3)).alias("time"), pl.lit("ICD10CM//F03.90").alias("code"),
        pl.lit(None, dtype=data["numeric_value"].dtype).alias("numeric_value"))
    changed = world["root"] / "meds_future"
    write_meds(changed, [list(data.select("subject_id", "time", "code", "numeric_value").iter_rows())
                         + list(future.iter_rows())], SPLITS)
    config = SampleConfig(samples=2, precision="fp32", splits=("held_out",))
    sample(world["run"], world["meds"], world["few"], tmp_path / "a", config, "cpu", progress=False)
    sample(world["run"], changed, world["few"], tmp_path / "b", config, "cpu", progress=False)
    for x, y in zip(_trajectories(tmp_path / "a", 2), _trajectories(tmp_path / "b", 2)):
        assert x.equals(y)


def test_undecided_trajectories_are_counted_not_dropped(world, tmp_path):
    """With two visits allowed, no trajectory reaches a 2-year horizon: each is undecided unless it drew an onset,
    counted per row and in sampling.json, and both estimates keep every trajectory in the denominator."""
    summary = sample(world["run"], world["meds"], world["labels"], tmp_path / "u",
                     SampleConfig(samples=4, max_visits=2, precision="fp32"), "cpu", progress=False)
    assert summary["ended"]["max_visits"] == summary["trajectories"]
    mc = pl.read_parquet(tmp_path / "u" / "monte_carlo" / "predictions.parquet")
    assert int(mc["undecided"].sum()) == summary["undecided_row_trajectories"] > 0
    # every trajectory without an onset is undecided, and the risk is onsets over all 4 samples
    onsets = np.round(4 * mc["predicted_boolean_probability"].to_numpy())
    assert np.all(mc["undecided"].to_numpy() == 4 - onsets)
    assert (mc["samples"] == 4).all()


# -- untruncated draws ---------------------------------------------------------------------------------------------


def _draw_many(sampler, vocab, sure: int, n: int, seed: int, repeated: int | None = None):
    """One visit's codes drawn for n trajectories of a one-visit history (the visit holds ``sure``; ``repeated``,
    if given, counts as twice a target in the window): (rows, visits, onsets, P(onset), per-token counts)."""
    subject = Subject(1, 0, np.array([10_000], np.int32), np.array([0, 1], np.int64), np.array([sure], np.int32))
    history = History(subject, 1, pl.Series([0]).cast(pl.Datetime).to_list()[0], [730])
    rows = [Trajectory(history, s, np.random.Generator(np.random.Philox(s + seed))) for s in range(n)]
    for t in rows:
        t.window_counts = np.zeros(len(vocab), np.int32)
        if repeated is not None:
            t.window_counts[repeated] = 2
    visits, onsets, p_onset, _ = sampler._draw_codes(rows, torch.zeros(n, 32, dtype=torch.float64), [10_001] * n)
    counts = np.zeros(len(vocab))
    for v in visits:
        counts[v[1:]] += 1
    return rows, visits, onsets, p_onset, counts


@torch.no_grad()
def test_code_draws_are_untruncated_bernoullis_at_the_model_probabilities(world):
    """A model whose next-visit logits are its output bias alone: the drawn frequencies of every token match the
    probability the logit stands for under the run's loss (BCE: sigmoid(bias); focal loss: the rate at which the
    bias minimises the expected loss) at the temperature, within sampling error; a token of probability 0.001
    appears. A repeat in the window is read back through its repeat weight."""
    tokenizer = world["tokenizer"]
    vocab = tokenizer.vocab
    config = preset("tiny")
    config.model.d_model, config.model.n_layers, config.model.n_heads = 32, 2, 2
    config.model.vocab_size = len(vocab)
    model = NextVisitModel(config.model).double().eval()
    supervised = np.flatnonzero(vocab.supervised_mask())
    probabilities = np.full(len(vocab), 0.05)
    sure, rare, half = supervised[:3]
    probabilities[[sure, rare, half]] = [0.999999, 0.001, 0.5]  # the sure token keeps visits non-empty
    for p in model.parameters():
        p.zero_()
    logits = np.log(probabilities / (1 - probabilities))
    model.output_bias.copy_(torch.from_numpy(logits))
    config.loss.kind = "bce"
    for temperature in (1.0, 2.0):
        sampler = Sampler(model, vocab, tokenizer, config, SampleConfig(temperature=temperature, precision="fp32"),
                          torch.tensor([rare]))
        n = 20_000
        rows, visits, onsets, p_onset, counts = _draw_many(sampler, vocab, sure, n, seed=7)
        expected = 1 / (1 + np.exp(-logits / temperature))
        freq = counts[supervised] / n
        sd = np.sqrt(expected[supervised] * (1 - expected[supervised]) / n)
        assert np.all(np.abs(freq - expected[supervised]) <= 4.5 * sd + 1e-9), (freq, expected[supervised])
        assert counts[rare] > 0
        # P(onset) in the kept draw: an empty draw is drawn again (at most max_redraws times)
        q = np.prod(1 - expected[supervised])
        retries = (1 - q ** (sampler.config.max_redraws + 1)) / (1 - q)
        assert np.allclose(p_onset, expected[rare] * retries) and onsets.sum() == counts[rare]
        assert sum(t.redraws for t in rows) <= n // 1000  # an all-empty draw needs the sure token to miss
    # focal loss: the bias of a token at rate r is the logit minimising the expected loss at r (the validation's
    # code-frequency baseline computes it by search); the sampler must draw it at r, not at sigmoid(logit)
    from nextvisit.train.validation import best_constant_logits

    config.loss.kind = "focal"
    rates = probabilities.copy()
    focal = best_constant_logits(rates, config.loss)
    uncommon = supervised[rates[supervised] < 0.1]
    assert np.all(1 / (1 + np.exp(-focal[uncommon])) > 5 * rates[uncommon])  # sigmoid(logit) would oversample
    model.output_bias.copy_(torch.from_numpy(focal))
    sampler = Sampler(model, vocab, tokenizer, config, SampleConfig(precision="fp32"), torch.tensor([rare]))
    n = 20_000
    _, _, _, _, counts = _draw_many(sampler, vocab, sure, n, seed=99)
    freq = counts[supervised] / n
    sd = np.sqrt(rates[supervised] * (1 - rates[supervised]) / n)
    assert np.all(np.abs(freq - rates[supervised]) <= 4.5 * sd + 1e-9), (freq, rates[supervised])
    # the same logit of a token already twice a target in the window stands for a higher rate (weight 0.25)
    from nextvisit.model.losses import implied_probability

    _, _, _, _, counts = _draw_many(sampler, vocab, sure, n, seed=99, repeated=half)
    repeated = counts[half] / n
    expected = float(implied_probability(torch.tensor(focal[half]), "focal", config.loss.gamma, config.loss.alpha,
                                         0.25))
    assert expected > rates[half] + 0.1 and abs(repeated - expected) <= 4.5 * np.sqrt(expected * (1 - expected) / n)


# -- meds-trajectory-evaluation and ACES -------------------------------------------------------------------------------

ACES_TASK = """\
predicates:
  dementia:
    code: {regex: "^ICD10CM//(F03|G30)"}
trigger: _ANY_EVENT
windows:
  input:
    start: trigger
    end: start + 1d
    start_inclusive: true
    end_inclusive: true
    index_timestamp: end
  target:
    start: input.end
    end: start + 730d
    start_inclusive: false
    end_inclusive: true
    label: dementia
"""


def test_aces_labels_of_the_trajectories_agree_with_the_monte_carlo_risk(world, tmp_path):
    """The trajectory files labelled by meds-trajectory-evaluation's ZSACES_label with an ACES task for the
    same question (a condition code within 730 days): per history, the share of positive labels over the
    samples is our Monte Carlo risk for the 730-day rows."""
    n = 4
    sample(world["run"], world["meds"], world["labels"], tmp_path / "t", SampleConfig(samples=n, precision="fp32"),
           "cpu", progress=False)
    (tmp_path / "task.yaml").write_text(ACES_TASK)
    labeller = Path(sys.executable).parent / "ZSACES_label"
    done = subprocess.run([str(labeller), f"task.criteria_fp={tmp_path / 'task.yaml'}",
                           f"trajectories_dir={tmp_path / 't' / 'trajectories'}", f"output_dir={tmp_path / 'zs'}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = pl.concat([pl.read_parquet(tmp_path / "zs" / f"{s}.parquet") for s in range(n)])
    assert labels["determinable"].all()
    share = labels.group_by("subject_id", "prediction_time").agg(pl.col("label").mean().alias("aces"),
                                                                pl.len().alias("n"))
    mc = pl.read_parquet(tmp_path / "t" / "monte_carlo" / "predictions.parquet").filter(pl.col("horizon_days") == 730)
    joined = mc.join(share, on=["subject_id", "prediction_time"], how="left")
    assert joined["aces"].null_count() == 0 and (joined["n"] == n).all()
    assert np.allclose(joined["aces"].to_numpy(), joined["predicted_boolean_probability"].to_numpy())
    assert 0 < joined["aces"].mean() < 1  # both outcomes occur, so agreement is not trivial


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_writes_predictions_evaluate_reads(world, tmp_path, capsys):
    """Both estimators reach `evaluate`; the run's visit-time calibration (written by pretraining) reaches the
    report as a figure and a table whose numbers are metrics.json's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    calibration = {"step": 10, "split": "tuning", "visits": 123, "days": [1, 30, 365],
                   "predicted_share": [0.1, 0.4, 0.9], "observed_share": [0.12, 0.38, 0.93]}
    (run / "visit_time_calibration.json").write_text(json.dumps(calibration))
    out = tmp_path / "traj"
    assert main(["sample", str(run), str(world["meds"]), str(world["labels"]), "--out", str(out),
                 "--samples", "2", "--precision", "fp32", "--device", "cpu"]) == 0
    assert "trajectories/s" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--out", str(tmp_path / "report"), "--bootstrap", "20"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "rao_blackwell" in json.dumps(metrics) and "monte_carlo" in json.dumps(metrics)
    model = next(name for name in metrics["models"] if "monte_carlo" in name)
    assert metrics["models"][model]["visit_time_calibration"]["observed_share"] == [0.12, 0.38, 0.93]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Visit-time head" in page and f'visit_time_calibration/observed_share/2">0.930<' in page
    assert list((tmp_path / "report").glob("*_visit_time.png"))
    # a folder it did not make is refused
    assert main(["sample", str(world["run"]), str(world["meds"]), str(world["labels"]), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_a_run_without_the_visit_time_head_is_refused(world, tmp_path, capsys):
    run = rolling_run(tmp_path / "old", world["tokenizer"], head=False)
    assert main(["sample", str(run), str(world["meds"]), str(world["labels"]), "--out", str(tmp_path / "o")]) == 2
    assert "visit-time head" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_run_with_the_recurrence_embedding_is_refused(world, tmp_path, capsys):
    run = rolling_run(tmp_path / "recurrence", world["tokenizer"], recurrence=True)
    assert main(["sample", str(run), str(world["meds"]), str(world["labels"]), "--out", str(tmp_path / "o")]) == 2
    assert "recurrence" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_trajectory_seed_depends_on_its_key_only():
    t = pl.Series([0]).cast(pl.Datetime).to_list()[0]
    a = np.random.Generator(np.random.Philox(trajectory_seed(0, 5, t, 2))).random(3)
    b = np.random.Generator(np.random.Philox(trajectory_seed(0, 5, t, 2))).random(3)
    c = np.random.Generator(np.random.Philox(trajectory_seed(0, 5, t, 3))).random(3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_risks_of_the_first_k_samples_come_from_the_same_run(world, tmp_path):
    """--sample-counts writes the risks of the first k samples: those of a run with k samples (same seeds)."""
    config = SampleConfig(samples=4, precision="fp32", splits=("held_out",), sample_counts=(1, 2))
    sample(world["run"], world["meds"], world["few"], tmp_path / "all", config, "cpu", progress=False)
    sample(world["run"], world["meds"], world["few"], tmp_path / "two", SampleConfig(samples=2, precision="fp32",
           splits=("held_out",)), "cpu", progress=False)
    for estimator in ("monte_carlo", "rao_blackwell"):
        first_two = pl.read_parquet(tmp_path / "all" / f"{estimator}_n2" / "predictions.parquet")
        alone = pl.read_parquet(tmp_path / "two" / estimator / "predictions.parquet")
        assert np.allclose(first_two["predicted_boolean_probability"], alone["predicted_boolean_probability"])
        assert (pl.read_parquet(tmp_path / "all" / f"{estimator}_n1" / "predictions.parquet")["samples"] == 1).all()
    with pytest.raises(Exception, match="sample-counts"):
        SampleConfig(samples=4, sample_counts=(8,)).validate()


def test_a_history_without_a_visit_is_counted_and_left_unscored(world, tmp_path):
    """A label row predicting before the subject's first visit (labels from elsewhere) is not rolled: null risks
    for both estimators, counted in sampling.json and in each estimator's info.json; the other rows as before."""
    rows = pl.read_parquet(world["few"] / "labels.parquet")
    subject = rows.filter(pl.col("split") == "held_out")["subject_id"][0]
    first = min(r[1] for r in cohort_rows() if r[0] == subject and r[2] == "VISIT//OUTPATIENT")
    early = rows.filter(pl.col("subject_id") == subject).head(1).with_columns(
        prediction_time=pl.lit(first - timedelta(days=30), dtype=pl.Datetime("us")))
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in world["few"].iterdir():
        (labels / path.name).write_bytes(path.read_bytes())
    pl.concat([rows, early.select(rows.columns)]).write_parquet(labels / "labels.parquet")
    config = SampleConfig(samples=2, precision="fp32", splits=("held_out",))
    summary = sample(world["run"], world["meds"], labels, tmp_path / "with", config, "cpu", progress=False)
    sample(world["run"], world["meds"], world["few"], tmp_path / "without", config, "cpu", progress=False)
    assert summary["rows_without_history"]["rows"] == 1 and summary["rows_without_history"]["histories"] == 1
    for estimator in ("monte_carlo", "rao_blackwell"):
        got = pl.read_parquet(tmp_path / "with" / estimator / "predictions.parquet")
        unscored = got.filter(pl.col("predicted_boolean_probability").is_null())
        assert unscored.select("subject_id", "prediction_time").rows() == early.select(
            "subject_id", "prediction_time").rows()
        assert got.drop_nulls("predicted_boolean_probability").equals(
            pl.read_parquet(tmp_path / "without" / estimator / "predictions.parquet"))
        info = json.loads((tmp_path / "with" / estimator / "info.json").read_text())
        assert info["rows_without_history"]["rows"] == 1


def test_bad_inputs_are_one_line_errors(world, tmp_path, capsys):
    base = ["sample", str(world["run"]), str(world["meds"]), str(world["labels"])]
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "a"), "--samples", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    # labels naming a subject the data does not hold
    labels = pl.read_parquet(world["labels"] / "labels.parquet").with_columns(pl.lit(999).alias("subject_id"))
    stranger = tmp_path / "stranger"
    write_labels(stranger, LabelResult(labels, {}), TASK)
    assert main(["sample", str(world["run"]), str(world["meds"]), str(stranger), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "999" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_a_horizon_past_the_heads_last_bin_warns_with_the_mass_beyond_it(world, tmp_path, capsys):
    labels = pl.read_parquet(world["few"] / "labels.parquet").with_columns(pl.lit(4000, dtype=pl.Int32).alias("horizon_days"))
    labels = labels.unique(["subject_id", "prediction_time"], keep="first", maintain_order=True)
    far = tmp_path / "far"
    write_labels(far, LabelResult(labels, {}), TASK)
    summary = sample(world["run"], world["meds"], far, tmp_path / "o", SampleConfig(samples=2, max_visits=3),
                     "cpu", progress=False)
    err = capsys.readouterr().err
    assert "4000 days reach past the visit-time head's last bin (3650 days, counted from the last visit)" in err
    assert "of the first gap's probability (given no visit up to the prediction day) lies beyond it" in err
    assert summary["warnings"]
