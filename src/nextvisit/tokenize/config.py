"""The tokenizer's configuration: every number it uses, validated, and the token names derived from them.

Contract: ``TokenizerConfig`` holds plain values only (no data); ``validate()`` raises ``UserError`` for any
value the tokenizer cannot use and returns the config; ``resolved()`` fixes ``max_time: now`` to a date so
that re-tokenizing later applies the same cut-off; ``to_dict()`` / ``from_dict()`` / ``load()`` round-trip
the ``tokenizer.yaml`` of a store. ``VOCABULARY_FIELDS`` are the fields a reused vocabulary fixes.
Depends on nothing else in ``nextvisit.tokenize``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from nextvisit.config import merge, read_yaml
from nextvisit.data import meds
from nextvisit.errors import UserError

AGE_PREFIX = "AGE//"
UNKNOWN_AGE_TOKEN = "AGE//unknown"


@dataclass
class TokenizerConfig:
    """Every number of the tokenizer. Defaults follow METHOD.md §2; ``docs/tokenizer.md`` explains each."""

    min_count: int = 10  # train events a token needs to enter the vocabulary
    lab_binning: str = "zscore"  # "zscore" (paper) or "quantile"
    z_edges: tuple = (-10.0, -3.0, -1.0, -0.5, 0.5, 1.0, 3.0, 10.0)  # paper: 7 bins; outside -> dropped
    quantile_bins: int = 7  # lab_binning: quantile; edges from train quantiles of z within the outer z edges
    quantile_resolution: float = 0.01  # z-width of the train histogram the quantile edges are read from
    # paper: 1-5, 5-10, 10-20, ..., 50-60, then 5-year buckets to 100, then 100+ (0-1 for infants)
    age_edges_years: tuple = (0, 1, 5, 10, 20, 30, 40, 50, 60, 65, 70, 75, 80, 85, 90, 95, 100)
    demographic_prefixes: tuple = ("GENDER//", "RACE//", "ETHNICITY//")  # plus every static (null-time) row
    exclude_prefixes: tuple = ()  # codes dropped from the inputs (e.g. amnesia codes for dementia tasks)
    always_include: tuple = (meds.DEATH_CODE,)  # codes in the vocabulary whatever their train count
    max_time: str | None = "now"  # events after this are in the future; "now", an ISO date, or null (no check)
    future_events: str = "error"  # "error" (stop and name the row) or "drop" (count as after_max_time)
    chunk_rows: int = 250_000  # rows read at a time from a shard (bounds memory per worker)

    def validate(self) -> "TokenizerConfig":
        if self.min_count < 1:
            raise UserError(f"tokenizer min_count must be at least 1, got {self.min_count}")
        if self.lab_binning not in ("zscore", "quantile"):
            raise UserError(f"tokenizer lab_binning is {self.lab_binning!r}; expected 'zscore' or 'quantile'")
        edges = [float(e) for e in self.z_edges]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"tokenizer z_edges must increase strictly, got {list(self.z_edges)}")
        if self.quantile_bins < 2 or self.quantile_resolution <= 0:
            raise UserError("tokenizer quantile_bins must be at least 2 and quantile_resolution positive")
        ages = list(self.age_edges_years)
        if len(ages) < 2 or ages[0] != 0 or any(b <= a for a, b in zip(ages, ages[1:])):
            raise UserError(f"tokenizer age_edges_years must start at 0 and increase, got {ages}")
        if self.future_events not in ("error", "drop"):
            raise UserError(f"tokenizer future_events is {self.future_events!r}; expected 'error' or 'drop'")
        if self.chunk_rows < 1:
            raise UserError("tokenizer chunk_rows must be positive")
        self.max_time_value()
        return self

    def max_time_value(self) -> datetime | None:
        if self.max_time is None:
            return None
        if self.max_time == "now":
            return datetime.now(timezone.utc).replace(tzinfo=None)
        try:
            value = datetime.fromisoformat(str(self.max_time))
        except ValueError:
            raise UserError(f"tokenizer max_time {self.max_time!r} is not 'now', null or an ISO date") from None
        if value.tzinfo is not None:  # MEDS times carry no time zone, so an aware cut-off compares with nothing
            raise UserError(f"tokenizer max_time {self.max_time!r} has a time zone; MEDS times have none: give the "
                            "date (and time) without it")
        return value

    def resolved(self) -> "TokenizerConfig":
        """A copy with ``max_time: now`` fixed to the current time, so re-tokenizing later (forecast) applies
        the very same cut-off as the store."""
        result = TokenizerConfig(**asdict(self))
        if result.max_time == "now":
            result.max_time = self.max_time_value().isoformat(timespec="seconds")
        return result

    def bin_labels(self) -> list[str]:
        """Lab bin labels, in bin order.

        >>> TokenizerConfig().bin_labels()[:2]
        ['z[-10,-3)', 'z[-3,-1)']
        """
        if self.lab_binning == "zscore":
            edges = [float(e) for e in self.z_edges]
            return [f"z[{a:g},{b:g})" for a, b in zip(edges, edges[1:])]
        return [f"q{i + 1}/{self.quantile_bins}" for i in range(self.quantile_bins)]

    def age_tokens(self) -> list[str]:
        """Age-bucket tokens in bucket order, then the token for an unknown birth day.

        >>> TokenizerConfig().age_tokens()[8:10], TokenizerConfig().age_tokens()[-2:]
        (['AGE//60-65', 'AGE//65-70'], ['AGE//100+', 'AGE//unknown'])
        """
        edges = [int(e) if float(e).is_integer() else float(e) for e in self.age_edges_years]
        tokens = [f"{AGE_PREFIX}{a}-{b}" for a, b in zip(edges, edges[1:])]
        return tokens + [f"{AGE_PREFIX}{edges[-1]}+", UNKNOWN_AGE_TOKEN]

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer config", base: "TokenizerConfig | None" = None) -> "TokenizerConfig":
        """``base`` (default: the defaults) with the fields of ``data`` applied; unknown fields are errors."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of tokenizer fields")
        data = dict(data.get("tokenizer", data))  # accept a file with or without a `tokenizer:` section
        return merge(base or cls(), data, source).validate()

    @classmethod
    def load(cls, path: Path, base: "TokenizerConfig | None" = None) -> "TokenizerConfig":
        return cls.from_dict(read_yaml(path), source=str(path), base=base)


# Fields that define what a token means; a store's vocabulary can only be reused with the same values.
VOCABULARY_FIELDS = ("lab_binning", "z_edges", "quantile_bins", "age_edges_years", "demographic_prefixes")
