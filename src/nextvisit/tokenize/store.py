"""The token store: what `nextvisit tokenize` writes and every model reads.

Layout of a store folder (all arrays are raw little-endian binaries read with ``numpy.memmap``)::

    store.json            format name/version, array dtypes, per-split sizes
    vocab.json            tokens (index = token id) and their kinds; see ``Vocabulary``
    lab_stats.parquet     per lab code: mean, std, count (train split only)
    tokenizer.yaml        the resolved tokenizer configuration
    manifest.json         events in/out per split and every dropped or replaced event by reason
    codes.parquet         code, description: the MEDS descriptions of the vocabulary's codes (for inspect)
    <split>/subject_ids.bin     int64 [S]     subject_id of each subject
    <split>/birth_days.bin      int32 [S]     day of birth (days since 1970-01-01), NO_DAY if unknown
    <split>/subject_visits.bin  int64 [S+1]   offsets into the visit arrays
    <split>/visit_days.bin      int32 [V]     calendar day of each visit (days since 1970-01-01)
    <split>/visit_tokens.bin    int64 [V+1]   offsets into tokens
    <split>/tokens.bin          int32 [N]     token ids of every visit: age token, demographics (first
                                              visit only), then the visit's code tokens, each once

A visit is one calendar day. SEP tokens are not stored: ``nextvisit.model.sequence`` places them between
visits when it builds model inputs, so the store stays independent of any model's context layout.

Reading: one subject at a time through the memory map (``SplitView.subject``); a scan of a whole split (training
statistics, the training plan) goes block by block (``split_blocks``), each block read from the files into memory,
so its memory stays one block's whatever the store's size.
"""

from __future__ import annotations

import json
import mmap
import os
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from nextvisit.data.meds import SPLITS  # noqa: F401 - the MEDS split names, re-exported for the store
from nextvisit.errors import UserError

STORE_FORMAT = "nextvisit-token-store"
STORE_VERSION = 1
NO_DAY = np.iinfo(np.int32).min

SPECIAL_TOKENS = ("PAD", "SEP", "MASK", "CLS", "UNK", "EOW")
PAD, SEP, MASK, CLS, UNK, EOW = range(len(SPECIAL_TOKENS))

# token kind -> meaning. Only "code" and "lab" tokens are prediction targets of the next-visit head.
TOKEN_KINDS = ("special", "code", "lab", "age", "demographic")
SUPERVISED_KINDS = ("code", "lab")

_ARRAYS = {
    "subject_ids": np.int64,
    "birth_days": np.int32,
    "subject_visits": np.int64,
    "visit_days": np.int32,
    "visit_tokens": np.int64,
    "tokens": np.int32,
}

# Tokens per block of a whole-split scan (``split_blocks``) on average: 4 MiB of int32 tokens (8 MiB more where
# numpy widens them to int64, as bincount does), well under 1 MiB of visits.
TOKENS_PER_BLOCK = 1 << 20


@dataclass
class Vocabulary:
    """Token strings (index = id) and their kinds. Lab tokens are ``CODE|bin``; a token's *code* is the
    part before ``|``."""

    tokens: list[str]
    kinds: list[str]

    def __post_init__(self):
        if len(self.tokens) != len(self.kinds):
            raise ValueError("tokens and kinds differ in length")
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the first tokens must be the specials {SPECIAL_TOKENS}")
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        """Token id, or UNK for a token outside the vocabulary."""
        return self.index.get(token, UNK)

    def code_of(self, token_id: int) -> str:
        return self.tokens[token_id].split("|", 1)[0]

    def ids_matching(self, prefixes, kinds=SUPERVISED_KINDS) -> np.ndarray:
        """Ids of tokens of the given kinds whose code starts with any of ``prefixes`` (MEDS code prefixes
        such as ``ICD10CM//F03``)."""
        prefixes = tuple(prefixes)
        return np.array(
            [i for i, (t, k) in enumerate(zip(self.tokens, self.kinds)) if k in kinds and t.split("|", 1)[0].startswith(prefixes)],
            dtype=np.int64,
        )

    def supervised_mask(self) -> np.ndarray:
        """Boolean [V]: tokens the next-visit head is trained to predict (clinical codes and lab tokens)."""
        return np.array([k in SUPERVISED_KINDS for k in self.kinds], dtype=bool)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "kinds": self.kinds}

    @classmethod
    def from_json(cls, data: dict) -> "Vocabulary":
        return cls(tokens=list(data["tokens"]), kinds=list(data["kinds"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class Subject:
    subject_id: int
    birth_day: int
    visit_days: np.ndarray  # int32 [n_visits]
    visit_offsets: np.ndarray  # int64 [n_visits + 1], offsets into tokens
    tokens: np.ndarray  # int32 [n_tokens]

    @property
    def n_visits(self) -> int:
        return len(self.visit_days)

    def visit(self, i: int) -> np.ndarray:
        return self.tokens[self.visit_offsets[i] : self.visit_offsets[i + 1]]


class SplitView:
    """Read-only access to one split of a store: the arrays memory-mapped, a subject read from the files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, int] = {}
        for name, dtype in _ARRAYS.items():
            path = self.folder / f"{name}.bin"
            if not path.exists():
                raise UserError(f"{path}: missing; the token store is incomplete, re-run `nextvisit tokenize`")
            size = path.stat().st_size // np.dtype(dtype).itemsize
            array = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
            setattr(self, name, array)
            self._files[name] = os.open(path, os.O_RDONLY)
        weakref.finalize(self, _close_all, list(self._files.values()))
        self._position: dict[int, int] | None = None  # subject_id -> index, built on the first look-up

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def index_of(self, subject_id: int) -> int | None:
        if self._position is None:
            self._position = {int(s): i for i, s in enumerate(read_block(self.subject_ids, 0, len(self)))}
        return self._position.get(int(subject_id))

    def subject(self, i: int) -> Subject:
        """Subject ``i``; its visits and tokens read from the files (``os.pread``; arrays read-only), not through
        the maps: a read there maps in the page cache's pages around it (large ones on file systems that keep
        large folios: about 200 KB per subject measured), and those stay in the resident set, so training's
        random reads would hold more and more of the split. The per-subject arrays (20 bytes a subject) are read
        through the maps."""
        v0, v1 = int(self.subject_visits[i]), int(self.subject_visits[i + 1])
        visit_tokens = self._read("visit_tokens", v0, v1 + 1)
        t0, t1 = int(visit_tokens[0]), int(visit_tokens[-1])
        return Subject(
            subject_id=int(self.subject_ids[i]),
            birth_day=int(self.birth_days[i]),
            visit_days=self._read("visit_days", v0, v1),
            visit_offsets=visit_tokens - t0,
            tokens=self._read("tokens", t0, t1),
        )

    def _read(self, name: str, begin: int, end: int) -> np.ndarray:
        dtype = np.dtype(_ARRAYS[name])
        return np.frombuffer(os.pread(self._files[name], (end - begin) * dtype.itemsize, begin * dtype.itemsize), dtype)

    def __iter__(self):
        for i in range(len(self)):
            yield self.subject(i)


def _close_all(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.close(descriptor)


def read_block(array: np.ndarray, begin: int, end: int) -> np.ndarray:
    """``array[begin:end]`` as an array in memory. A store array (a ``SplitView`` attribute, mapped whole) is read
    from its file, not through the map: pages touched through a map stay in the process's resident set (and in its
    peak, ``ru_maxrss``) until the map closes, so a scan of a whole split through it would hold the split."""
    if end <= begin:
        return np.zeros(0, array.dtype)
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return np.fromfile(array.filename, dtype=array.dtype, count=end - begin,
                           offset=array.offset + begin * array.itemsize)
    return np.array(array[begin:end])


class SplitBlock:
    """Consecutive whole subjects of a split, read into memory: the split's arrays for subjects
    ``first_subject ..`` (visits ``first_visit ..``), the offsets counted from the block's own start. The tokens
    are read on first use (a scan of visits alone never reads them)."""

    def __init__(self, split, first_subject: int, stop_subject: int):
        self.first_subject = first_subject
        subject_visits = read_block(split.subject_visits, first_subject, stop_subject + 1)
        self.first_visit, stop_visit = int(subject_visits[0]), int(subject_visits[-1])
        self.subject_visits = subject_visits - self.first_visit  # int64 [s + 1], offsets into the block's visits
        self.visit_days = read_block(split.visit_days, self.first_visit, stop_visit)  # int32 [v]
        visit_tokens = read_block(split.visit_tokens, self.first_visit, stop_visit + 1)
        self._token_range = int(visit_tokens[0]), int(visit_tokens[-1])
        self.visit_tokens = visit_tokens - visit_tokens[0]  # int64 [v + 1], offsets into the block's tokens
        self._split = split

    @property
    def n_subjects(self) -> int:
        return len(self.subject_visits) - 1

    @cached_property
    def tokens(self) -> np.ndarray:
        """int32 [n]"""
        return read_block(self._split.tokens, *self._token_range)


def split_blocks(split, tokens_per_block: int | None = None) -> Iterator[SplitBlock]:
    """A split's subjects in order, in blocks of whole subjects of about ``tokens_per_block`` tokens on average
    (default ``TOKENS_PER_BLOCK``; the split's mean tokens per subject sets the subjects per block). ``split``: a
    ``SplitView``, or anything with its four offset and token arrays."""
    tokens_per_block = TOKENS_PER_BLOCK if tokens_per_block is None else tokens_per_block
    n_subjects = len(split.subject_visits) - 1
    per_block = max(1, tokens_per_block * n_subjects // max(len(split.tokens), 1))
    for first in range(0, n_subjects, per_block):
        yield SplitBlock(split, first, min(n_subjects, first + per_block))


def concatenated_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of ranges ``starts[k]..ends[k]-1``, one range after another (int64).

    >>> concatenated_ranges(np.array([0, 5, 9]), np.array([2, 5, 11])).tolist()
    [0, 1, 9, 10]
    """
    lengths = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


class TokenStore:
    """A token store folder. Raises ``UserError`` naming the folder when it is missing or foreign."""

    def __init__(self, path: Path):
        self.path = Path(path)
        info_path = self.path / "store.json"
        if not info_path.exists():
            raise UserError(f"{self.path}: not a token store (no store.json); create one with `nextvisit tokenize`")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{info_path}: unreadable ({exc}); re-run `nextvisit tokenize`") from None
        if self.info.get("format") != STORE_FORMAT:
            raise UserError(f"{info_path}: format is {self.info.get('format')!r}, expected {STORE_FORMAT!r}; give a "
                            "token store written by `nextvisit tokenize`")
        if self.info.get("version") != STORE_VERSION:
            raise UserError(f"{info_path}: store version {self.info.get('version')}, this nextvisit reads {STORE_VERSION}; "
                            "tokenize the MEDS dataset again with this nextvisit (`nextvisit tokenize`)")
        self.vocab = Vocabulary.load(self.path / "vocab.json")
        manifest_path = self.path / "manifest.json"
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        self._splits: dict[str, SplitView] = {}

    def split(self, name: str) -> SplitView:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; expected one of {SPLITS}")
        if name not in self._splits:
            self._splits[name] = SplitView(self.path / name)
        return self._splits[name]


class SplitWriter:
    """Appends subjects to one split's arrays, streaming to disk (memory stays bounded by one subject)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files = {name: open(self.folder / f"{name}.bin", "wb") for name in _ARRAYS}
        self.n_subjects = 0
        self.n_visits = 0
        self.n_tokens = 0
        self._files["subject_visits"].write(np.zeros(1, np.int64).tobytes())
        self._files["visit_tokens"].write(np.zeros(1, np.int64).tobytes())

    def append(self, subject_id: int, birth_day: int, visit_days: np.ndarray, visit_lengths: np.ndarray, tokens: np.ndarray):
        """One subject: ``visit_days`` [n_visits], ``visit_lengths`` tokens per visit, ``tokens`` concatenated."""
        visit_lengths = np.asarray(visit_lengths, dtype=np.int64)
        if len(visit_days) != len(visit_lengths) or visit_lengths.sum() != len(tokens):
            raise ValueError(f"subject {subject_id}: visit arrays do not add up")
        f = self._files
        f["subject_ids"].write(np.int64(subject_id).tobytes())
        f["birth_days"].write(np.int32(birth_day).tobytes())
        f["visit_days"].write(np.asarray(visit_days, dtype=np.int32).tobytes())
        f["visit_tokens"].write((self.n_tokens + np.cumsum(visit_lengths)).astype(np.int64).tobytes())
        f["tokens"].write(np.asarray(tokens, dtype=np.int32).tobytes())
        self.n_subjects += 1
        self.n_visits += len(visit_days)
        self.n_tokens += int(visit_lengths.sum())
        f["subject_visits"].write(np.int64(self.n_visits).tobytes())

    def append_batch(self, subject_ids, birth_days, subject_visit_counts, visit_days, visit_lengths, tokens):
        """Many subjects at once (vectorized): ``subject_visit_counts`` [S] visits per subject,
        ``visit_days`` and ``visit_lengths`` [V], ``tokens`` [N] concatenated in subject, visit order."""
        subject_visit_counts = np.asarray(subject_visit_counts, dtype=np.int64)
        visit_lengths = np.asarray(visit_lengths, dtype=np.int64)
        if (len(subject_ids) != len(birth_days) or len(subject_ids) != len(subject_visit_counts)
                or subject_visit_counts.sum() != len(visit_days) or len(visit_days) != len(visit_lengths)
                or visit_lengths.sum() != len(tokens)):
            raise ValueError("batch arrays do not add up")
        f = self._files
        f["subject_ids"].write(np.asarray(subject_ids, dtype=np.int64).tobytes())
        f["birth_days"].write(np.asarray(birth_days, dtype=np.int32).tobytes())
        f["visit_days"].write(np.asarray(visit_days, dtype=np.int32).tobytes())
        f["visit_tokens"].write((self.n_tokens + np.cumsum(visit_lengths)).astype(np.int64).tobytes())
        f["subject_visits"].write((self.n_visits + np.cumsum(subject_visit_counts)).astype(np.int64).tobytes())
        f["tokens"].write(np.asarray(tokens, dtype=np.int32).tobytes())
        self.n_subjects += len(subject_ids)
        self.n_visits += len(visit_days)
        self.n_tokens += len(tokens)

    def append_split(self, folder: Path, chunk: int = 1 << 22) -> None:
        """Append every subject of another split folder (same layout), streaming ``chunk`` elements at a
        time and shifting its offsets, so parts written in parallel join in bounded memory."""
        folder = Path(folder)
        sizes = {}
        for name, dtype in _ARRAYS.items():
            sizes[name] = (folder / f"{name}.bin").stat().st_size // np.dtype(dtype).itemsize
        shifts = {"subject_visits": self.n_visits, "visit_tokens": self.n_tokens}
        for name, dtype in _ARRAYS.items():
            source = np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r") if sizes[name] else np.zeros(0, dtype)
            start = 1 if name in shifts else 0  # offset arrays start with their own 0
            for begin in range(start, sizes[name], chunk):
                block = np.asarray(source[begin : begin + chunk])
                if name in shifts:
                    block = block + shifts[name]
                self._files[name].write(block.astype(dtype, copy=False).tobytes())
            del source
        self.n_subjects += sizes["subject_ids"]
        self.n_visits += sizes["visit_days"]
        self.n_tokens += sizes["tokens"]

    def close(self) -> dict:
        for handle in self._files.values():
            handle.close()
        return {"subjects": self.n_subjects, "visits": self.n_visits, "tokens": self.n_tokens}


def write_store_info(path: Path, split_sizes: dict, vocab_size: int, extra: dict | None = None) -> None:
    info = {"format": STORE_FORMAT, "version": STORE_VERSION, "vocab_size": vocab_size, "splits": split_sizes}
    info.update(extra or {})
    (Path(path) / "store.json").write_text(json.dumps(info, indent=2))
