"""Reading MEDS data shards: validated, normalized chunks of whole subjects, and row-group ranges for workers.

Contract: ``read_chunks(path, chunk_rows, row_groups)`` yields frames that never cut a subject, in file order,
each with an extra ``row`` column (the row's 0-based position in the file, for error messages); the frames of
the ranges ``shard_ranges(path, n)`` returns hold every row of the file exactly once. Any unreadable or
unsorted input raises ``UserError`` naming the file and row. Depends on nothing else in
``nextvisit.tokenize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from nextvisit.data import meds
from nextvisit.errors import UserError


@dataclass
class _Range:
    """Where a row-group range of a shard lies, and the subject just before it (``None`` at row 0)."""

    scan: pl.LazyFrame
    offset: int  # first row of the range
    end_row: int  # rows past this only finish the range's last subject
    total_rows: int
    previous_subject: int | None


def _open_range(path: Path, row_groups: tuple[int, int] | None) -> _Range:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        n_groups = metadata.num_row_groups
        first, stop = row_groups if row_groups is not None else (0, n_groups)
        group_rows = [metadata.row_group(i).num_rows for i in range(n_groups)]
        offset = sum(group_rows[:first])
        end_row = offset + sum(group_rows[first:stop])  # rows past this only finish the last subject
        total_rows = metadata.num_rows
        scan = pl.scan_parquet(path).select(meds.CORE_COLUMNS)
        previous_subject = None
        if offset > 0:
            previous_subject = scan.select("subject_id").slice(offset - 1, 1).collect().item()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); re-export this shard") from None
    return _Range(scan, offset, end_row, total_rows, previous_subject)


def _batches(path: Path, shard: _Range, chunk_rows: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """``(first row, raw frame)`` of ``chunk_rows`` rows at a time from the range's start to the file's end."""
    position = shard.offset
    while position < shard.total_rows:
        try:
            batch = shard.scan.slice(position, chunk_rows).collect()
        except Exception as exc:
            raise UserError(f"{path}: damaged after row {position} ({type(exc).__name__}: {exc}); "
                            "re-export this shard") from None
        if batch.height == 0:
            return
        yield position, batch
        position += batch.height


def read_chunks(path: Path, chunk_rows: int, row_groups: tuple[int, int] | None = None,
                validate: bool = True) -> Iterator[pl.DataFrame]:
    """Validated, normalized frames of about ``chunk_rows`` rows from one shard, each holding whole subjects
    (a subject cut by a batch boundary is carried into the next frame). Each frame has an extra ``row``
    column: the row's 0-based position in the file, for error messages.

    ``row_groups=(a, b)`` reads the subjects whose first row lies in row groups ``a..b-1``: rows continuing
    a subject that started before row group ``a`` are left to the previous range, and the last subject is
    followed into later row groups. Ranges that cover a file's row groups therefore split it into disjoint
    sets of whole subjects that workers can read in parallel. ``validate=False`` skips the null and order
    checks, for a second pass over rows an earlier pass has checked."""
    source = str(path)
    shard = _open_range(path, row_groups)
    end_row, previous_subject = shard.end_row, shard.previous_subject
    carry: pl.DataFrame | None = None
    skipping = previous_subject is not None
    owned_last = None  # subject of the range's last row, once read: it is followed past the range's end
    for position, batch in _batches(path, shard, chunk_rows):
        frame = meds.normalize_events(batch, source)
        frame = frame.with_columns(row=pl.int_range(position, position + frame.height, dtype=pl.Int64))
        if skipping:  # leading rows of a subject that started in the previous range
            meds.check_events(frame, source, row_offset=int(frame["row"][0]))
            if frame["subject_id"][0] < previous_subject:
                raise UserError(f"{source}: rows are not sorted by subject_id: row {frame['row'][0]} (subject "
                                f"{frame['subject_id'][0]}) comes after subject {previous_subject}; sort each shard "
                                "by subject_id, time")
            frame = frame.slice(frame["subject_id"].search_sorted(previous_subject, "right"))  # sorted: a leading block
            skipping = frame.height == 0
            if frame.height and frame["row"][0] >= end_row:
                return  # the range held nothing but the previous range's subject
        if carry is not None:
            frame = pl.concat([carry, frame])
            carry = None
        if frame.height == 0:
            continue
        if validate:
            meds.check_events(frame, source, row_offset=int(frame["row"][0]))  # sorted from here on
        subjects = frame.get_column("subject_id")
        first_row = int(frame["row"][0])
        if first_row + frame.height > end_row:
            if owned_last is None:
                owned_last = subjects[end_row - 1 - first_row]
            cut = subjects.search_sorted(owned_last, "right")
            if cut < frame.height:  # the range's last subject ends in this batch
                yield frame.slice(0, cut)
                return
        cut = subjects.search_sorted(subjects[-1], "left")
        carry = frame.slice(cut)
        if cut:
            yield frame.slice(0, cut)
    if carry is not None and carry.height:
        yield carry


def shard_ranges(path: Path, rows_per_task: int) -> list[tuple[int, int]]:
    """Consecutive row-group ranges of about ``rows_per_task`` rows that cover a shard."""
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path)
    ranges, start, rows = [], 0, 0
    for i in range(metadata.num_row_groups):
        rows += metadata.row_group(i).num_rows
        if rows >= rows_per_task:
            ranges.append((start, i + 1))
            start, rows = i + 1, 0
    if start < metadata.num_row_groups or not ranges:
        ranges.append((start, metadata.num_row_groups))
    return ranges
