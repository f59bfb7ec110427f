"""Corpus, tokenised once into memory-mapped token files, and batches drawn from them.

Sources (`find_source`):
- none: the built-in corpus, the `.py` files of the running interpreter's standard library
  (`site-packages`/`dist-packages` excluded). Every Python install has it, so training works with
  no download. Its `test/` folders are kept on purpose: they are ordinary idiomatic Python (classes,
  asserts, fixtures) and hold more than half the text (CPython 3.11: ~31 MB with them, ~13 MB
  without), and a small model gains more from more text than from slightly tidier text.
- a text file (one document), a folder (every .txt/.md/.py file below it, hidden ones skipped), or
  a .jsonl file (one document per line, in its "text" field).

Documents go to train or validation as a whole (`split_flags`), by a hash of a stable key, so
the split never changes between runs and no file leaks into both; a lone document is cut instead,
its tail going to validation. In each split every document is preceded by the end-of-text token,
so the model learns where documents start and a prompt of just that token asks for a fresh one.

Text is read as UTF-8. A file holding a NUL byte is not text (an executable, an image, UTF-16) and
is refused; bytes that are not UTF-8 (a Latin-1 file's é) become U+FFFD, and how many, in how many
files, is reported with the first such file, so that a wrongly encoded corpus does not pass unseen.

`prepare_data` tokenises once into `train.bin`/`val.bin` (uint16, or uint32 past 65,536 ids) next
to `meta.json` and `tokenizer.json`, in a cache folder keyed by a fingerprint of the source files
and the tokenizer, and later runs with the same fingerprint reuse it. Training then reads windows
through `numpy.memmap`, so the corpus never has to fit in memory, and it never does while it is
prepared either: documents are streamed from disk one at a time (a long lone file in ~1 MB pieces)
and every pass over the tokens is chunked (see "streamed documents" below). Every file is written atomically
and meta.json last; a cache folder whose files do not match its meta.json (a disk that filled up,
a file deleted by hand) is rebuilt, not trusted.
"""

import codecs
import errno
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from minparcae import backend
from minparcae.files import atomic_write, describe_os_error
from minparcae.tokenizer import Tokenizer, load_tokenizer, train_bpe

CACHE_ENV = "MINPARCAE_CACHE"
TEXT_SUFFIXES = (".txt", ".md", ".py")
VAL_FRACTION = 0.02
TOKENIZER_SAMPLE_BYTES = 5_000_000
_CACHE_VERSION = 2  # bump when what the token files hold changes, so old caches are not reused
# 2: a lone file is cut, and sampled for the tokenizer, by bytes and in pieces (streamed)


class DataError(ValueError):
    """A problem with the training data that the user can fix; the message says how."""


@dataclass(frozen=True)
class Source:
    """Where the text comes from: `kind` ("stdlib", "file", "folder" or "jsonl"), the `root` path
    and the sorted `files` that will be read (their sizes and mtimes make the cache key)."""
    kind: str
    root: Path
    files: tuple

    @property
    def description(self):
        if self.kind == "stdlib":
            return f"Python standard library at {self.root} ({len(self.files)} .py files)"
        if self.kind == "folder":
            return f"folder {self.root} ({len(self.files)} files)"
        return f"{self.kind} {self.root}"


def _walk(root, keep_dir):
    """Text files below `root` whose folders all pass `keep_dir(name)`, sorted by relative POSIX
    path so every machine lists them in the same order."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if keep_dir(d)]
        found += [Path(folder, f) for f in filenames
                  if Path(f).suffix.lower() in TEXT_SUFFIXES and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def find_source(path=None):
    """The `Source` for `path` (None: the standard library's own source code)."""
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in _walk(root, lambda d: d not in ("site-packages", "dist-packages"))
                 if p.suffix == ".py"]
        return Source("stdlib", root, tuple(files))
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist: pass a text file, a folder of "
                        ".txt/.md/.py files, or a .jsonl file with a \"text\" field per line.")
    if root.is_dir():
        files = _walk(root, lambda d: not d.startswith("."))
        if not files:
            raise DataError(f"folder {root} holds no .txt, .md or .py files: add some text files "
                            "or pass a single text file or .jsonl file instead.")
        return Source("folder", root, tuple(files))
    return Source("jsonl" if root.suffix.lower() == ".jsonl" else "file", root, (root,))


def _read_text(path, undecodable):
    """The text of a file as UTF-8; undecodable bytes become U+FFFD and are counted into
    `undecodable` (path -> replacements). A NUL byte means the file is not text at all."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(describe_os_error(err, "cannot read") + ": fix it or remove it from the "
                        "data.") from None
    return _decode(raw, path, 0, undecodable)


def _decode(raw, path, offset, undecodable, decoder=None, final=True):
    """raw bytes (found at `offset` in `path`) as text, refusing a NUL byte and counting
    replacements into `undecodable`; `decoder`: an incremental UTF-8 decoder for a file read in
    pieces."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} is not text (a NUL byte at offset {offset + nul}): pass UTF-8 text "
                        "files (a UTF-16 file must be converted to UTF-8 first).")
    text = decoder.decode(raw, final) if decoder else raw.decode("utf-8", errors="replace")
    if undecodable is not None:
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        if replaced > 0:
            undecodable[path] = undecodable.get(path, 0) + replaced
    return text


def _open(path):
    """A text file of the corpus opened for reading in binary; a DataError naming it if it cannot be."""
    try:
        return open(path, "rb")
    except OSError as err:
        raise DataError(describe_os_error(err, "cannot read") + ": fix it or remove it from the "
                        "data.") from None


def _report_undecodable(undecodable):
    if undecodable:
        first = next(iter(undecodable))
        print(f"note: {len(undecodable)} file(s) are not valid UTF-8 ({sum(undecodable.values())} "
              f"undecodable byte sequences read as U+FFFD), the first being {first}; convert them "
              "to UTF-8 (e.g. iconv -f latin1 -t utf-8) if that is not what you want.",
              file=sys.stderr)


def _unit_hash(key):
    """A stable pseudo-random number in [0, 1) for `key` (unlike `hash()`, the same in every
    process)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


# ----------------------------------------------------------------------------- streamed documents
#
# Nothing below holds the corpus in memory. A `Plan` lists the documents without their text (for
# a .jsonl file: each line's offset, found in one streaming pass); the split, the tokenizer's sample
# and the token files then read the texts one document (or one ~1 MB piece of a long file) at a
# time. Memory grows with the number of documents (24 bytes each), never with the text.

PIECE_BYTES = 1 << 20  # a long single document is read, and tokenised, in pieces of about this size


class Plan(NamedTuple):
    """The documents of a source, without their text, and the split.

    u: each document's stable hash in [0, 1) (of its relative path, or of its text for .jsonl);
    at: .jsonl only, each document's line offset in the file; size: each document's bytes;
    is_val: which documents are validation. A source of one document is cut instead: `cut` is
    the byte offset (or, for one .jsonl line, the character) where its validation part begins."""
    source: Source
    u: np.ndarray
    at: np.ndarray
    size: np.ndarray
    is_val: np.ndarray
    cut: int | None


def _jsonl_records(path, undecodable=None):
    """(line offset, text) of every non-blank line of a .jsonl file, read one line at a time."""
    with _open(path) as f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            line, start = _decode(raw, path, offset, undecodable), offset
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not valid JSON ({e.msg}): write one JSON "
                                "object per line.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path} line {n} has no \"text\" string field: give every line a "
                                "JSON object such as {\"text\": \"...\"}.")
            yield start, record["text"]


def plan_documents(source, val_fraction=VAL_FRACTION, undecodable=None):
    """The `Plan` of `source`: its documents in source order and their split (`split_flags`). A
    .jsonl file is read once, line by line; files are only listed."""
    if source.kind == "jsonl":
        u, at, size = [], [], []
        for offset, text in _jsonl_records(source.root, undecodable):
            u.append(_unit_hash(text))
            at.append(offset)
            size.append(len(text.encode("utf-8")))
    else:
        u = [_unit_hash(p.relative_to(source.root).as_posix() if source.kind != "file" else p.name)
             for p in source.files]
        at = [0] * len(u)
        try:
            size = [p.stat().st_size for p in source.files]
        except OSError as err:
            raise DataError(describe_os_error(err, "cannot read") + ": fix it or remove it from "
                            "the data.") from None
    u, at, size = np.array(u, dtype=np.float64), np.array(at, dtype=np.int64), np.array(size, dtype=np.int64)
    if not size.sum():
        raise DataError(f"{source.description} contains no text: point the data path at a "
                        "non-empty corpus.")
    cut = None
    if len(u) == 1:
        cut = (_text_cut(_read_one(source, at, 0, None), val_fraction) if source.kind == "jsonl"
               else _byte_cut(source.files[0], val_fraction))
    return Plan(source, u, at, size, split_flags(u, val_fraction) if len(u) > 1 else np.zeros(1, bool), cut)


def split_flags(u, val_fraction=VAL_FRACTION):
    """Which documents are validation, from their hashes u: those below `val_fraction`; if that
    leaves a side empty, the document with the lowest (or highest) hash moves over."""
    is_val = np.asarray(u) < val_fraction
    if not is_val.any():
        is_val[int(np.argmin(u))] = True
    if is_val.all():
        is_val[int(np.argmax(u))] = False
    return is_val


def _text_cut(text, val_fraction):
    """Where a lone document held in memory is cut: a line break near (1 − val_fraction) of it."""
    target = int(len(text) * (1 - val_fraction))
    return text.rfind("\n", 0, target) + 1 or target


def _byte_cut(path, val_fraction):
    """Where a lone file is cut: after the last line break before (1 − val_fraction) of its bytes,
    or at the character boundary there when the PIECE_BYTES before it hold no line break."""
    with _open(path) as f:
        target = int(os.fstat(f.fileno()).st_size * (1 - val_fraction))
    lo = max(0, target - PIECE_BYTES)
    with _open(path) as f:
        f.seek(lo)
        window = f.read(target - lo + 4)
    nl = window.rfind(b"\n", 0, target - lo)
    if nl >= 0:
        return lo + nl + 1
    cut = target - lo
    while 0 < cut < len(window) and (window[cut] & 0xC0) == 0x80:  # inside a character
        cut -= 1
    return lo + cut


def _read_one(source, at, i, undecodable):
    """The text of document i."""
    if source.kind != "jsonl":
        return _read_text(source.files[i], undecodable)
    with _open(source.root) as f:
        f.seek(int(at[i]))
        raw = f.readline()
    return json.loads(_decode(raw, source.root, int(at[i]), undecodable))["text"]


def _safe_cut(text):
    """Where a piece of a long document may end so that tokenising the pieces apart gives the
    tokens of the whole: after a line break whose next character is not whitespace (no
    pre-tokenisation pattern joins across it). len(text) when there is none."""
    i = text.rfind("\n")
    while i >= 0:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return len(text)


def _file_pieces(path, start, end, undecodable=None):
    """The text of bytes start..end of a file in pieces of about PIECE_BYTES, cut by `_safe_cut`
    (a stretch of 16 pieces without a safe cut, which real text does not have, is cut anyway)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with _open(path) as f:
        f.seek(start)
        pos = start
        while pos < end:
            raw = f.read(min(PIECE_BYTES, end - pos))
            if not raw:
                break
            text = carry + _decode(raw, path, pos, undecodable, decoder, final=pos + len(raw) >= end)
            pos += len(raw)
            cut = _safe_cut(text) if pos < end else len(text)
            if cut == len(text) and pos < end and len(text) < 16 * PIECE_BYTES:
                carry = text  # no safe place to cut yet: read on (up to 16 pieces, then cut anyway)
                continue
            carry = text[cut:]
            if cut:
                yield text[:cut]
    if carry:
        yield carry


def iter_texts(plan, split=None, undecodable=None):
    """(text, starts_document) of the documents of one split ("train", "val"; None: all) in source
    order, one document, or one piece of a lone long document, at a time."""
    src = plan.source
    if plan.cut is not None:  # one document, cut in two
        if src.kind == "jsonl":
            text = _read_one(src, plan.at, 0, undecodable)
            parts = {"train": text[:plan.cut], "val": text[plan.cut:], None: text}[split]
            yield parts, True
            return
        size = int(plan.size[0])
        lo, hi = {"train": (0, plan.cut), "val": (plan.cut, size), None: (0, size)}[split]
        for i, piece in enumerate(_file_pieces(src.files[0], lo, hi, undecodable)):
            yield piece, i == 0
        return
    want = None if split is None else (split == "val")
    if src.kind == "jsonl":
        for i, (_, text) in enumerate(_jsonl_records(src.root)):
            if want is None or plan.is_val[i] == want:
                yield text, True
        return
    for i, path in enumerate(src.files):
        if want is None or plan.is_val[i] == want:
            yield _read_text(path, undecodable), True


def tokenizer_sample(plan, max_bytes=TOKENIZER_SAMPLE_BYTES):
    """Texts to train the tokenizer on: training documents in hash order (a stable shuffle, so the
    sample spans the whole corpus rather than its alphabetical start) until `max_bytes`; of a lone
    document, its first pieces until `max_bytes`."""
    sample, n = [], 0
    if plan.cut is not None:
        for text, _ in iter_texts(plan, "train"):
            if n >= max_bytes:
                break
            sample.append(text)
            n += len(text.encode("utf-8"))
        return sample
    train = np.flatnonzero(~plan.is_val)
    for i in train[np.argsort(plan.u[train], kind="stable")]:
        if n >= max_bytes:
            break
        text = _read_one(plan.source, plan.at, int(i), None)
        sample.append(text)
        n += len(text.encode("utf-8"))
    return sample


def token_dtype(vocab_size):
    """The smallest unsigned dtype holding every id: uint16 up to 65,536 ids, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


@dataclass
class Dataset:
    """Token ids of both splits as read-only memmaps, the tokenizer that made them, the cache
    folder they live in, its meta.json contents, and whether they came from the cache."""
    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer
    folder: Path
    meta: dict
    cached: bool


def default_cache_dir():
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minparcae")


def _fingerprint(source, val_fraction, tokenizer_key):
    """Hash of everything the token files depend on: the file list with sizes and mtimes (so an
    edited file invalidates the cache without reading any file), the split and the tokenizer."""
    files = []
    for p in source.files:
        try:
            st = p.stat()
        except OSError as err:  # e.g. a symbolic link whose target is gone
            raise DataError(describe_os_error(err, "cannot read", p) + ": fix it or remove it from "
                            "the data.") from None
        files.append([p.relative_to(source.root).as_posix(), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": _CACHE_VERSION, "kind": source.kind, "root": str(source.root),
                       "files": files, "val_fraction": val_fraction, "tokenizer": tokenizer_key},
                      sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_tokens(tmp, texts, tokenizer, dtype, progress):
    """Tokenise (text, starts_document) pairs into the binary file `tmp`, each document preceded by
    the end-of-text id; returns the number of tokens. Texts are encoded in ~1 MB batches on
    tiktoken's threads and written as they come: memory holds one batch."""
    n_tokens = 0
    with open(tmp, "wb") as f:
        for batch in _batches_by_size(texts, 1_000_000):
            for (text, starts), ids in zip(batch, tokenizer.encode_batch([t for t, _ in batch])):
                f.write(np.array([tokenizer.eot_id] * starts + ids, dtype=dtype).tobytes())
                n_tokens += len(ids) + starts
            progress.update(sum(len(t.encode("utf-8")) for t, _ in batch))
    return n_tokens


def _batches_by_size(texts, max_chars):
    """(text, starts) pairs in consecutive lists of about `max_chars` characters each."""
    batch, size = [], 0
    for item in texts:
        batch.append(item)
        size += len(item[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def open_tokens(folder):
    """(train, val, meta) of a prepared cache folder: the two splits as memmaps and meta.json's
    contents. Raises DataError naming what is wrong when meta.json is missing or damaged, or a
    token file is missing or does not hold the number of tokens that meta.json records."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        counts = {name: int(meta[f"{name}_tokens"]) for name in ("train", "val")}
        sizes = {name: (folder / f"{name}.bin").stat().st_size for name in counts}
    except OSError as err:
        raise DataError(describe_os_error(err, "cannot read the token cache") + ".") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is damaged ({type(err).__name__}).") from None
    for name, n in counts.items():
        if sizes[name] != n * dtype.itemsize:
            raise DataError(f"{folder / name}.bin holds {sizes[name]} bytes, not the {n} tokens "
                            "of its meta.json.")
    train, val = (np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r") if n else
                  np.zeros(0, dtype) for name, n in counts.items())  # mmap refuses empty files
    return train, val, meta


def prepare_data(source=None, tokenizer=None, vocab_size=4096, cache_dir=None,
                 val_fraction=VAL_FRACTION, tokenizer_sample_bytes=TOKENIZER_SAMPLE_BYTES):
    """Tokenise a corpus once and return it as a `Dataset` of memmapped token files.

    `source`: a path (see `find_source`) or None for the standard library. `tokenizer`: a
    `Tokenizer`, what `load_tokenizer` takes (a saved .json, a Hugging Face tokenizer.json or its
    folder, a tiktoken name), or None to train a BPE of `vocab_size` ids on up to
    `tokenizer_sample_bytes` of the training split. Results live in
    `cache_dir` (default: $MINPARCAE_CACHE or ~/.cache/minparcae) / <kind>-<fingerprint>/ and are
    reused whenever the fingerprint matches; the fingerprint does not cover file contents, only
    their sizes and mtimes."""
    src = find_source(source)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    tokenizer_key = (tokenizer.fingerprint if tokenizer is not None
                     else {"train_bpe": vocab_size, "sample_bytes": tokenizer_sample_bytes})
    fingerprint = _fingerprint(src, val_fraction, tokenizer_key)
    folder = Path(cache_dir or default_cache_dir()) / f"{src.kind}-{fingerprint}"
    meta_path = folder / "meta.json"
    if meta_path.exists():  # meta.json is written last: its presence means the folder was finished
        try:
            train, val, meta = open_tokens(folder)
            return Dataset(train, val, Tokenizer.load(folder / "tokenizer.json"), folder, meta, True)
        except (DataError, OSError, ValueError, KeyError) as err:
            print(f"note: the token cache {folder} is damaged ({err}); rebuilding it.",
                  file=sys.stderr)
            meta_path.unlink(missing_ok=True)
    try:
        return _build_cache(src, folder, fingerprint, tokenizer, vocab_size, val_fraction,
                            tokenizer_sample_bytes)
    except OSError as err:
        hint = "free some space or pass" if err.errno == errno.ENOSPC else "pass"
        raise DataError(describe_os_error(err, "cannot write the token cache", err.filename or folder)
                        + f": {hint} another --cache-dir.") from None


def _build_cache(src, folder, fingerprint, tokenizer, vocab_size, val_fraction,
                 tokenizer_sample_bytes):
    folder.mkdir(parents=True, exist_ok=True)
    undecodable = {}
    plan = plan_documents(src, val_fraction, undecodable)
    if tokenizer is None:
        tokenizer = train_bpe(tokenizer_sample(plan, tokenizer_sample_bytes), vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    with tqdm(total=int(plan.size.sum()), unit="B", unit_scale=True, desc="tokenising",
              disable=None) as bar:
        n_train = atomic_write(folder / "train.bin", lambda tmp: _write_tokens(
            tmp, iter_texts(plan, "train", undecodable), tokenizer, dtype, bar))
        n_val = atomic_write(folder / "val.bin", lambda tmp: _write_tokens(
            tmp, iter_texts(plan, "val", undecodable), tokenizer, dtype, bar))
    _report_undecodable(undecodable)
    atomic_write(folder / "tokenizer.json", tokenizer.save)
    meta = {"fingerprint": fingerprint, "source": src.description, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint, "val_fraction": val_fraction,
            "train_documents": int((~plan.is_val).sum()), "val_documents": int(plan.is_val.sum()) or
            int(plan.cut is not None),
            "train_tokens": n_train, "val_tokens": n_val}
    atomic_write(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    train, val, meta = open_tokens(folder)
    return Dataset(train, val, tokenizer, folder, meta, False)


def check_context(dataset, context):
    """Stop before training if either split is shorter than one window of context + 1 tokens."""
    for name, tokens in (("training", dataset.train), ("validation", dataset.val)):
        if len(tokens) < context + 1:
            raise DataError(f"the {name} split of {dataset.meta['source']} holds {len(tokens)} "
                            f"tokens, fewer than one window of context + 1 = {context + 1}: use "
                            "more text or a smaller --context.")


def _check_window(tokens, context):
    if len(tokens) < context + 1:
        raise DataError(f"the token file holds {len(tokens)} tokens, fewer than one window of "
                        f"context + 1 = {context + 1}: use a larger corpus or a smaller context.")


def _windows(tokens, offsets, context):
    """(x, y) on the active device from windows of context+1 tokens at `offsets`: y is x shifted
    by one, the next-token target of every position."""
    w = np.asarray(tokens[offsets[:, None] + np.arange(context + 1)], dtype=np.int64)  # (B, T+1)
    return backend.to_device(w[:, :-1]), backend.to_device(w[:, 1:])


def get_batch(tokens, batch_size, context, rng, rows=None):
    """A training batch of `batch_size` windows at uniformly random offsets drawn from `rng` (a
    `numpy.random.Generator`, so a seeded run sees the same batches): x, y int64 of shape
    (batch_size, context). `rows` (a slice) reads only those windows of the batch: a rank of a
    data-parallel run draws the whole batch's offsets, as one process would, and reads its share."""
    _check_window(tokens, context)
    offsets = rng.integers(0, len(tokens) - context, size=batch_size)
    return _windows(tokens, offsets if rows is None else offsets[rows], context)


def iter_eval_batches(tokens, batch_size, context, max_batches=None):
    """Validation batches over fixed windows, spread evenly over the whole file (non-overlapping
    when it is long enough), so the validation loss is the same number every time it is computed.
    All windows when `max_batches` is None; the last batch may be smaller."""
    _check_window(tokens, context)
    n = (len(tokens) - 1) // context
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    offsets = np.linspace(0, len(tokens) - context - 1, n).round().astype(np.int64)
    for i in range(0, n, batch_size):
        yield _windows(tokens, offsets[i:i + batch_size], context)


def unigram_entropy(tokens, vocab_size, eval_tokens=None):
    """Loss in nats per token of the best predictor that ignores context: the unigram distribution
    of `tokens` with add-one (Laplace) smoothing, p(v) = (count(v) + 1) / (N + vocab_size), so an
    id never seen in training still has a finite loss; evaluated as cross-entropy on `eval_tokens`
    (default: `tokens` themselves). A model that has learned anything beats it. Counted in chunks
    so a memory-mapped corpus is never copied whole."""
    counts = token_counts(tokens, vocab_size)
    log_p = np.log(counts + 1.0) - np.log(len(tokens) + vocab_size)
    eval_counts = counts if eval_tokens is None else token_counts(eval_tokens, vocab_size)
    return float(-(eval_counts * log_p).sum() / eval_counts.sum())


def token_counts(tokens, vocab_size, chunk=1 << 22):
    """How often each id occurs in `tokens`, read `chunk` tokens at a time."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in _chunks(tokens, chunk):
        part = np.bincount(part, minlength=vocab_size)
        if len(part) > vocab_size:
            raise ValueError(f"token id {len(part) - 1} is outside the vocabulary of {vocab_size}.")
        counts += part
    return counts


def _chunks(tokens, chunk):
    """`tokens` in consecutive arrays of `chunk`. A whole token file's memmap is read through
    plain reads of its file: its pages then sit in the system's page cache, not in this process's
    resident memory, as touching every page of the mapping would leave them."""
    name = getattr(tokens, "filename", None)
    if isinstance(tokens, np.memmap) and name and os.path.exists(name) and \
            os.path.getsize(name) == tokens.offset + tokens.nbytes and tokens.flags.c_contiguous:
        with open(name, "rb") as f:
            f.seek(tokens.offset)
            while True:
                part = np.fromfile(f, dtype=tokens.dtype, count=chunk)
                if not len(part):
                    return
                yield part
    for i in range(0, len(tokens), chunk):
        yield np.asarray(tokens[i:i + chunk])


def encode_source(path, tokenizer):
    """Every document of a text source (see `find_source`) encoded with `tokenizer`, each preceded
    by its end-of-text id, as one array: evaluation text for a model that comes with its own
    tokenizer (no cache, no split)."""
    undecodable = {}
    plan = plan_documents(find_source(path), undecodable=undecodable)
    parts = []
    for batch in _batches_by_size(iter_texts(plan, None, undecodable), 1_000_000):
        for (_, starts), ids in zip(batch, tokenizer.encode_batch([t for t, _ in batch])):
            parts.append(np.array([tokenizer.eot_id] * starts + ids, dtype=token_dtype(tokenizer.vocab_size)))
    _report_undecodable(undecodable)
    return np.concatenate(parts)
