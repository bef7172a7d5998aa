"""Fitting on the train split: per-code statistics, lab statistics, quantile edges and the vocabulary.

Contract: every function is pure (frames and arrays in, frames and arrays out) and works on one chunk or on
the merge of many, so that fitting shard by shard gives exactly what fitting all train events at once gives:

- ``code_statistics(events)`` per chunk, combined exactly by ``merge_statistics(parts)``;
- ``lab_statistics(stats)``: the lab codes (``code, count, mean, std``);
- ``z_histogram(events, labs)`` per chunk (summed), read by ``with_quantile_edges`` for quantile bins;
- ``fit_vocabulary(stats, labs)``: the ``Vocabulary`` in its fixed order (specials, ages, demographics, codes).

Only kept events count (``nextvisit.tokenize.events.annotate``). Depends on ``config``, ``events`` and ``store``.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import polars as pl

from nextvisit.data import meds
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.events import annotate
from nextvisit.tokenize.store import SPECIAL_TOKENS, Vocabulary

_STAT_SCHEMA = {"code": pl.String, "n_events": pl.Int64, "n_values": pl.Int64, "mean": pl.Float64,
                "m2": pl.Float64, "demographic": pl.Boolean}


def code_statistics(events: pl.DataFrame, config: TokenizerConfig, max_time: datetime | None) -> pl.DataFrame:
    """Per code over the kept events of ``events``: event count, count / mean / sum of squared deviations
    (``m2``) of the finite values, and whether it is a demographic. Mergeable with ``merge_statistics``."""
    kept = annotate(events.lazy(), config, max_time)[0].filter(pl.col("reason") == 0)
    value = pl.col("numeric_value").cast(pl.Float64)
    usable = pl.when(value.is_finite() & ~pl.col("demographic")).then(value)  # null otherwise
    stats = kept.with_columns(usable=usable).group_by("code").agg(
        n_events=pl.len().cast(pl.Int64),
        n_values=pl.col("usable").count().cast(pl.Int64),
        mean=pl.col("usable").mean(),
        m2=pl.col("usable").var(ddof=0) * pl.col("usable").count(),
        demographic=pl.col("demographic").any(),
    )
    return stats.collect().cast(_STAT_SCHEMA)


def merge_statistics(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Combine per-chunk ``code_statistics`` exactly (parallel mean/variance update)."""
    if not parts:
        return pl.DataFrame(schema=_STAT_SCHEMA)
    frame = pl.concat(parts).with_columns(pl.col("mean").fill_null(0.0), pl.col("m2").fill_null(0.0))
    total = frame.group_by("code").agg(
        pl.col("n_events").sum(),
        pl.col("n_values").sum().alias("n_total"),
        (pl.col("mean") * pl.col("n_values")).sum().alias("weighted"),
        pl.col("demographic").any(),
    ).with_columns(mean=pl.when(pl.col("n_total") > 0).then(pl.col("weighted") / pl.col("n_total")))
    frame = frame.join(total.select("code", pl.col("mean").alias("grand_mean")), on="code")
    m2 = frame.group_by("code").agg(
        m2=(pl.col("m2") + pl.col("n_values") * (pl.col("mean") - pl.col("grand_mean").fill_null(0.0)) ** 2).sum()
    )
    return (
        total.join(m2, on="code")
        .select("code", "n_events", pl.col("n_total").alias("n_values"), "mean", "m2", "demographic")
        .sort("code")
        .cast(_STAT_SCHEMA)
    )


def lab_statistics(stats: pl.DataFrame, config: TokenizerConfig) -> pl.DataFrame:
    """Lab codes from merged statistics: non-demographic codes with at least ``min_count`` (and 2) finite
    train values and a positive SD. Columns ``code, count, mean, std`` (sample SD)."""
    need = max(config.min_count, 2)
    labs = stats.filter(~pl.col("demographic") & (pl.col("n_values") >= need)).with_columns(
        std=(pl.col("m2") / (pl.col("n_values") - 1)).sqrt()
    )
    labs = labs.filter(pl.col("std").is_finite() & (pl.col("std") > 0))
    return labs.select("code", pl.col("n_values").alias("count"), "mean", "std").sort("code")


def fit_vocabulary(stats: pl.DataFrame, labs: pl.DataFrame, config: TokenizerConfig) -> Vocabulary:
    """Specials, age buckets, demographics, then clinical codes sorted by code, each followed by its lab bins.

    A code's plain token needs ``min_count`` train events without a usable value (or with a value when the
    code has no lab statistics); a lab code enters with all its bins."""
    lab_codes = set(labs.get_column("code").to_list())
    tokens = list(SPECIAL_TOKENS)
    kinds = ["special"] * len(tokens)
    for token in config.age_tokens():
        tokens.append(token)
        kinds.append("age")
    always = set(config.always_include)
    rows = stats.with_columns(
        plain_count=pl.col("n_events") - pl.when(pl.col("code").is_in(list(lab_codes))).then(pl.col("n_values")).otherwise(0)
    ).sort("code")
    for code, plain_count in rows.filter(pl.col("demographic")).select("code", "plain_count").iter_rows():
        if plain_count >= config.min_count or code in always:
            tokens.append(code)
            kinds.append("demographic")
    clinical = {code: count for code, count in rows.filter(~pl.col("demographic")).select("code", "plain_count").iter_rows()}
    for code in sorted(set(clinical) | (always - set(tokens))):
        if clinical.get(code, 0) >= config.min_count or code in always:
            tokens.append(code)
            kinds.append("code")
        if code in lab_codes:
            for label in config.bin_labels():
                tokens.append(f"{code}|{label}")
                kinds.append("lab")
    return Vocabulary(tokens=tokens, kinds=kinds)


# -- quantile bins: a fine train histogram of z per lab code ----------------------------------------------
def _histogram_bins(config: TokenizerConfig) -> int:
    low, high = float(config.z_edges[0]), float(config.z_edges[-1])
    return int(math.ceil((high - low) / config.quantile_resolution))


def z_histogram(events: pl.DataFrame, labs: pl.DataFrame, config: TokenizerConfig, max_time) -> np.ndarray:
    """Counts [n_labs, n_bins] of in-range train z values on a grid of width ``quantile_resolution``;
    rows follow ``labs`` order. Summing the arrays of several chunks gives the dataset's histogram."""
    n_bins = _histogram_bins(config)
    low = float(config.z_edges[0])
    table = labs.select("code", "mean", "std").with_row_index("lab_row")
    kept = (
        annotate(events.lazy().select(meds.CORE_COLUMNS), config, max_time)[0]
        .filter((pl.col("reason") == 0) & ~pl.col("demographic"))
        .join(table.lazy(), on="code")
        .select("lab_row", z=(pl.col("numeric_value").cast(pl.Float64) - pl.col("mean")) / pl.col("std"))
        .filter(pl.col("z").is_finite() & (pl.col("z") >= low) & (pl.col("z") <= float(config.z_edges[-1])))
        .collect()
    )
    rows = kept.get_column("lab_row").to_numpy().astype(np.int64)
    grid = np.clip(((kept.get_column("z").to_numpy() - low) / config.quantile_resolution).astype(np.int64), 0, n_bins - 1)
    return np.bincount(rows * n_bins + grid, minlength=labs.height * n_bins).reshape(labs.height, n_bins)


def with_quantile_edges(labs: pl.DataFrame, histograms: list[np.ndarray], config: TokenizerConfig) -> pl.DataFrame:
    """Inner bin edges (in z) at the train quantiles k / quantile_bins, read from the summed histograms."""
    histogram = np.sum(histograms, axis=0) if histograms else np.zeros((labs.height, _histogram_bins(config)))
    low = float(config.z_edges[0])
    quantiles = np.arange(1, config.quantile_bins) / config.quantile_bins
    edges = []
    for counts in np.atleast_2d(histogram)[: labs.height]:
        cumulative = np.cumsum(counts)
        total = cumulative[-1] if len(cumulative) else 0
        if total == 0:
            edges.append([float(e) for e in np.linspace(low, float(config.z_edges[-1]), config.quantile_bins + 1)[1:-1]])
            continue
        grid_bin = np.searchsorted(cumulative, quantiles * total, side="left")
        edges.append([low + (b + 1) * config.quantile_resolution for b in grid_bin])
    return labs.with_columns(edges=pl.Series(edges, dtype=pl.List(pl.Float64)))

