"""``nextvisit inspect``: one subject's timeline from a token store, as readable text.

Contract: ``format_timeline(store, subject_id)`` reads only the store (``codes.parquet`` for descriptions
when present) and returns the subject's visits: date, age, and each token with its MEDS description; a
subject in no split raises ``UserError``. ``inspect_cli`` prints it (a closed pipe is not an error).
Depends only on ``nextvisit.tokenize.store``. (Named ``timeline`` so as not to shadow the standard
``inspect`` module.)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import polars as pl

from nextvisit.errors import UserError
from nextvisit.tokenize.store import NO_DAY, SPLITS, TokenStore
from nextvisit.units import DAYS_PER_YEAR


def _describe(token: str, kind: str, descriptions: dict) -> str:
    if kind == "lab":
        code, _, label = token.partition("|")
        text = descriptions.get(code)
        return f"{text} ({label})" if text else f"value bin {label}"
    if kind in ("code", "demographic"):
        return descriptions.get(token, "")
    return ""


def format_timeline(store: TokenStore, subject_id: int) -> str:
    """A subject's visits as readable text: date, age, and each token with its MEDS description."""
    found = None
    for split in SPLITS:
        if not (store.path / split).exists():
            continue
        view = store.split(split)
        index = view.index_of(subject_id)
        if index is not None:
            found = (split, view.subject(index))
            break
    if found is None:
        raise UserError(f"{store.path}: subject {subject_id} is in no split of this store; it may have had no visit "
                        "left after cleaning (see manifest.json, subjects_without_visits) or no split in the MEDS data")
    split, subject = found
    codes_path = store.path / "codes.parquet"
    descriptions = {}
    if codes_path.exists():
        table = pl.read_parquet(codes_path)
        descriptions = dict(zip(table["code"].to_list(), table["description"].to_list()))
    vocab = store.vocab
    epoch = np.datetime64("1970-01-01", "D")
    known_birth = subject.birth_day != NO_DAY
    born = str(epoch + np.timedelta64(subject.birth_day, "D")) if known_birth else "unknown"
    lines = [f"subject {subject.subject_id} ({split}): born {born}, {subject.n_visits} visits, {len(subject.tokens)} tokens"]
    width = max((len(vocab.tokens[t]) for t in subject.tokens), default=0)
    for i in range(subject.n_visits):
        day = int(subject.visit_days[i])
        age = f"age {(day - subject.birth_day) / DAYS_PER_YEAR:.1f}" if known_birth else "age unknown"
        gap = f", {day - int(subject.visit_days[i - 1])} days after the previous visit" if i else ""
        lines.append(f"{epoch + np.timedelta64(day, 'D')}  {age}  (visit {i + 1}{gap})")
        for token_id in subject.visit(i).tolist():
            token, kind = vocab.tokens[token_id], vocab.kinds[token_id]
            text = _describe(token, kind, descriptions)
            lines.append(f"    {token:<{width}}  {text}".rstrip())
    return "\n".join(lines)


def inspect_cli(args) -> int:
    text = format_timeline(TokenStore(args.store), args.subject)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
