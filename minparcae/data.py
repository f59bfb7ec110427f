"""Corpus, tokenised once into memory-mapped token files, and batches drawn from them.

Sources (`find_source`):
- none: the built-in corpus, the `.py` files of the running interpreter's standard library
  (`site-packages`/`dist-packages` excluded). Every Python install has it, so training works with
  no download. Its `test/` folders are kept on purpose: they are ordinary idiomatic Python (classes,
  asserts, fixtures) and hold more than half the text (CPython 3.11: ~31 MB with them, ~13 MB
  without), and a small model gains more from more text than from slightly tidier text.
- a text file (one document), a folder (every .txt/.md/.py file below it, hidden ones skipped), or
  a .jsonl file (one document per line, in its "text" field).

Documents go to train or validation as a whole (`split_documents`), by a hash of a stable key, so
the split never changes between runs and no file leaks into both; a lone document is cut instead,
its tail going to validation. In each split every document is preceded by the end-of-text token,
so the model learns where documents start and a prompt of just that token asks for a fresh one.

Text is read as UTF-8. A file holding a NUL byte is not text (an executable, an image, UTF-16) and
is refused; bytes that are not UTF-8 (a Latin-1 file's é) become U+FFFD, and how many, in how many
files, is reported with the first such file, so that a wrongly encoded corpus does not pass unseen.

`prepare_data` tokenises once into `train.bin`/`val.bin` (uint16, or uint32 past 65,536 ids) next
to `meta.json` and `tokenizer.json`, in a cache folder keyed by a fingerprint of the source files
and the tokenizer, and later runs with the same fingerprint reuse it. Training then reads windows
through `numpy.memmap`, so the corpus never has to fit in memory. Every file is written atomically
and meta.json last; a cache folder whose files do not match its meta.json (a disk that filled up,
a file deleted by hand) is rebuilt, not trusted.
"""

import errno
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minparcae import backend
from minparcae.files import atomic_write, describe_os_error
from minparcae.tokenizer import Tokenizer, load_tokenizer, train_bpe

CACHE_ENV = "MINPARCAE_CACHE"
TEXT_SUFFIXES = (".txt", ".md", ".py")
VAL_FRACTION = 0.02
TOKENIZER_SAMPLE_BYTES = 5_000_000
_CACHE_VERSION = 1  # bump when the layout of the token files changes, so old caches are not reused


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
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} is not text (a NUL byte at offset {nul}): pass UTF-8 text files "
                        "(a UTF-16 file must be converted to UTF-8 first).")
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced:
        undecodable[path] = replaced
    return text


def _report_undecodable(undecodable):
    if undecodable:
        first = next(iter(undecodable))
        print(f"note: {len(undecodable)} file(s) are not valid UTF-8 ({sum(undecodable.values())} "
              f"undecodable byte sequences read as U+FFFD), the first being {first}; convert them "
              "to UTF-8 (e.g. iconv -f latin1 -t utf-8) if that is not what you want.",
              file=sys.stderr)


def read_documents(source):
    """The documents of `source` as (key, text) pairs; the key decides the train/val split. Files
    are keyed by relative path; JSONL documents by their text, so duplicates fall on one side."""
    undecodable = {}
    if source.kind == "jsonl":
        docs = []
        for n, line in enumerate(_read_text(source.root, undecodable).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source.root} line {n} is not valid JSON ({e.msg}): write one "
                                "JSON object per line.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{source.root} line {n} has no \"text\" string field: give every "
                                "line a JSON object such as {\"text\": \"...\"}.")
            docs.append((record["text"], record["text"]))
    elif source.kind == "file":
        docs = [(source.root.name, _read_text(source.root, undecodable))]
    else:
        docs = [(p.relative_to(source.root).as_posix(), _read_text(p, undecodable))
                for p in source.files]
    _report_undecodable(undecodable)
    if not any(text for _, text in docs):
        raise DataError(f"{source.description} contains no text: point the data path at a "
                        "non-empty corpus.")
    return docs


def _unit_hash(key):
    """A stable pseudo-random number in [0, 1) for `key` (unlike `hash()`, the same in every
    process)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def split_documents(docs, val_fraction=VAL_FRACTION):
    """Split (key, text) documents into (train, val) lists, keeping the input order in each.

    A document goes to validation when the hash of its key falls below `val_fraction`; if that
    leaves a side empty, the document with the lowest (or highest) hash moves over. A single
    document is cut at a line break instead, the last `val_fraction` of it becoming validation."""
    if len(docs) == 1:
        key, text = docs[0]
        target = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, target) + 1 or target
        return [(key, text[:cut])], [(key + "#val", text[cut:])]
    u = [_unit_hash(key) for key, _ in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


def tokenizer_sample(train_docs, max_bytes=TOKENIZER_SAMPLE_BYTES):
    """Texts to train the tokenizer on: training documents in hash order (a stable shuffle, so the
    sample spans the whole corpus rather than its alphabetical start) until `max_bytes`."""
    sample, n = [], 0
    for _, text in sorted(train_docs, key=lambda d: _unit_hash(d[0])):
        if n >= max_bytes:
            break
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


def _write_tokens(tmp, docs, tokenizer, dtype, progress):
    """Tokenise `docs` into the binary file `tmp`, each document preceded by the end-of-text id;
    returns the number of tokens. Documents are encoded in ~1 MB batches on tiktoken's threads."""
    n_tokens = 0
    with open(tmp, "wb") as f:
        for batch in _batches_by_size(docs, 1_000_000):
            for ids in tokenizer.encode_batch(batch):
                f.write(np.array([tokenizer.eot_id] + ids, dtype=dtype).tobytes())
                n_tokens += len(ids) + 1
            progress.update(sum(map(len, batch)))
    return n_tokens


def _batches_by_size(docs, max_chars):
    """The texts of `docs` in consecutive lists of about `max_chars` characters each."""
    batch, size = [], 0
    for _, text in docs:
        batch.append(text)
        size += len(text)
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
    train_docs, val_docs = split_documents(read_documents(src), val_fraction)
    if tokenizer is None:
        tokenizer = train_bpe(tokenizer_sample(train_docs, tokenizer_sample_bytes), vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    total = sum(len(text) for _, text in train_docs + val_docs)
    with tqdm(total=total, unit="char", unit_scale=True, desc="tokenising", disable=None) as bar:
        n_train = atomic_write(folder / "train.bin",
                               lambda tmp: _write_tokens(tmp, train_docs, tokenizer, dtype, bar))
        n_val = atomic_write(folder / "val.bin",
                             lambda tmp: _write_tokens(tmp, val_docs, tokenizer, dtype, bar))
    atomic_write(folder / "tokenizer.json", tokenizer.save)
    meta = {"fingerprint": fingerprint, "source": src.description, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint, "val_fraction": val_fraction,
            "train_documents": len(train_docs), "val_documents": len(val_docs),
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


def get_batch(tokens, batch_size, context, rng):
    """A training batch of `batch_size` windows at uniformly random offsets drawn from `rng` (a
    `numpy.random.Generator`, so a seeded run sees the same batches): x, y int64 of shape
    (batch_size, context)."""
    _check_window(tokens, context)
    offsets = rng.integers(0, len(tokens) - context, size=batch_size)
    return _windows(tokens, offsets, context)


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
    (default: `tokens` themselves). A model that has learned anything beats it."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)
    log_p = np.log(counts + 1.0) - np.log(len(tokens) + vocab_size)
    eval_counts = counts if eval_tokens is None else np.bincount(np.asarray(eval_tokens),
                                                                 minlength=vocab_size)
    return float(-(eval_counts * log_p).sum() / eval_counts.sum())


def encode_source(path, tokenizer):
    """Every document of a text source (see `find_source`) encoded with `tokenizer`, each preceded
    by its end-of-text id, as one array: evaluation text for a model that comes with its own
    tokenizer (no cache, no split)."""
    docs = read_documents(find_source(path))
    ids = []
    for batch in _batches_by_size(docs, 1_000_000):
        for doc in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eot_id)
            ids.extend(doc)
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))
