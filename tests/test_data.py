"""The data pipeline: sources, the split, cached token files, batches, the unigram baseline."""

import json
import math
import os

import numpy as np
import pytest

from minparcae import backend
from minparcae import data
from minparcae.data import (DataError, find_source, get_batch, iter_eval_batches, iter_texts,
                            plan_documents, prepare_data, split_flags, token_counts, token_dtype,
                            unigram_entropy)
from minparcae.tokenizer import Tokenizer, train_bpe


def _paragraphs(seed, n):
    """Generated English-like text, different for every seed."""
    rng = np.random.default_rng(seed)
    words = ["the", "loop", "state", "token", "model", "learns", "a", "small", "stable", "of",
             "and", "every", "step", "sees", "input", "again", "décor", "naïve", "🙂"]
    return "\n".join(" ".join(rng.choice(words, size=12)) + "." for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    return train_bpe([_paragraphs(s, 50) for s in range(5)], 300)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(30):
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(_paragraphs(i, 20))
    (root / "notes.md").write_text("# Notes\n" + _paragraphs(99, 5))
    (root / "script.py").write_text("print('hi')\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden" / "skip.txt").write_text("never read")
    return root


def _docs(prepared_split, tokenizer):
    """The documents of a token file, cut at the end-of-text ids that precede each one."""
    text = tokenizer.decode(prepared_split)
    return text.split("<|endoftext|>")[1:]


# ---- sources and the split ----

def test_stdlib_listing_is_deterministic_and_excludes_site_packages():
    a, b = find_source(), find_source()
    assert a == b and a.kind == "stdlib"
    rel = [p.relative_to(a.root).as_posix() for p in a.files]
    assert rel == sorted(rel)
    assert "os.py" in rel and any(r.startswith("test/") for r in rel)
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert all(r.endswith(".py") for r in rel)


def test_stdlib_split_is_stable_and_disjoint():
    src = find_source()
    plan = plan_documents(src)
    assert np.array_equal(plan.is_val, plan_documents(src).is_val)
    assert len(plan.is_val) == len(src.files) and plan.cut is None
    assert 0.005 < plan.is_val.mean() < 0.05
    keys = [p.relative_to(src.root).as_posix() for p in src.files]  # the hash is of the path
    assert np.array_equal(plan.is_val, split_flags([data._unit_hash(k) for k in keys]))


def test_split_keeps_both_sides_non_empty():
    for n in (2, 3, 5):
        is_val = split_flags([data._unit_hash(f"k{i}") for i in range(n)])
        assert is_val.any() and not is_val.all()


def test_single_document_is_cut_at_a_line_break(tmp_path):
    text = "".join(f"line {i} é\n" for i in range(200))
    path = tmp_path / "one.txt"
    path.write_text(text)
    plan = plan_documents(find_source(path), val_fraction=0.1)
    train = "".join(t for t, _ in iter_texts(plan, "train"))
    val = "".join(t for t, _ in iter_texts(plan, "val"))
    assert train + val == text and train.endswith("\n")
    assert 0 < len(val.encode()) <= 0.1 * len(text.encode()) + 12
    one = tmp_path / "one.jsonl"  # a lone .jsonl document is cut in its text
    one.write_text(json.dumps({"text": text}) + "\n")
    plan = plan_documents(find_source(one), val_fraction=0.1)
    assert "".join(t for t, _ in iter_texts(plan, "train")) + next(iter_texts(plan, "val"))[0] == text


def test_a_long_file_is_read_in_pieces_that_tokenise_as_the_whole(tmp_path, tok, monkeypatch):
    """A lone file is streamed in pieces of about PIECE_BYTES, cut where no token spans the cut:
    the pieces join to the text (multi-byte characters across piece boundaries included) and
    their tokens are those of the whole text; the tokenizer sample stops at its byte budget."""
    monkeypatch.setattr(data, "PIECE_BYTES", 500)
    text = _paragraphs(3, 400).replace("\n", "\n    ", 50) + "\n\n\ndécor 🙂\n" * 30
    path = tmp_path / "book.txt"
    path.write_text(text)
    plan = plan_documents(find_source(path))
    train = list(iter_texts(plan, "train"))
    assert len(train) > 20 and [s for _, s in train] == [True] + [False] * (len(train) - 1)
    whole = "".join(t for t, _ in train)
    assert whole + "".join(t for t, _ in iter_texts(plan, "val")) == text
    assert sum((tok.encode(t) for t, _ in train), []) == tok.encode(whole)
    ds = prepare_data(path, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert list(ds.train) == [tok.eot_id] + tok.encode(whole)
    sample = data.tokenizer_sample(plan, max_bytes=2000)
    sizes = [len(t.encode()) for t in sample]
    assert sum(sizes) >= 2000 > sum(sizes[:-1]) and sample == [t for t, _ in train[:len(sample)]]


def test_jsonl_documents_are_found_by_their_offsets(tmp_path):
    texts = [f"doc {i} " + "é" * i for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    plan = plan_documents(find_source(path))
    assert [data._read_one(plan.source, plan.at, i, None) for i in range(30)] == texts
    assert list(plan.size) == [len(t.encode()) for t in texts]
    assert [t for t, _ in iter_texts(plan)] == texts


def test_token_counts_in_chunks(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, 10_001).astype(np.uint16)
    want = np.bincount(tokens, minlength=50)
    assert np.array_equal(token_counts(tokens, 50, chunk=999), want)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r")  # read through the file
    assert np.array_equal(token_counts(mapped, 50, chunk=999), want)
    assert np.array_equal(token_counts(mapped[5:], 50, chunk=999), np.bincount(tokens[5:], minlength=50))
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary of 50"):
        token_counts(np.array([50]), 50)


def test_folder_source(folder, tok, tmp_path):
    src = find_source(folder)
    rel = [p.relative_to(folder).as_posix() for p in src.files]
    assert rel == sorted(rel) and len(rel) == 32
    assert "image.png" not in rel and not any(r.startswith(".hidden") for r in rel)
    ds = prepare_data(folder, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert ds.meta["train_documents"] + ds.meta["val_documents"] == 32
    assert ds.meta["val_documents"] >= 1
    originals = {(folder / r).read_text() for r in rel}
    train_docs, val_docs = _docs(ds.train, tok), _docs(ds.val, tok)
    assert set(train_docs) | set(val_docs) == originals
    assert not set(train_docs) & set(val_docs)


def test_file_source(tmp_path, tok):
    path = tmp_path / "book.txt"
    path.write_text(_paragraphs(7, 200))
    ds = prepare_data(path, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert "".join(_docs(ds.train, tok) + _docs(ds.val, tok)) == path.read_text()
    assert 0 < ds.meta["val_tokens"] < ds.meta["train_tokens"] / 10


def test_jsonl_source(tmp_path, tok):
    texts = [_paragraphs(i, 3) for i in range(40)] + [_paragraphs(0, 3)]  # one duplicate
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is skipped
    ds = prepare_data(path, tokenizer=tok, cache_dir=tmp_path / "cache")
    train_docs, val_docs = _docs(ds.train, tok), _docs(ds.val, tok)
    assert sorted(train_docs + val_docs) == sorted(texts)
    assert val_docs and not set(train_docs) & set(val_docs)  # the duplicate stays on one side


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data path .*nope does not exist: pass a text file, a "
                                        r"folder of \.txt/\.md/\.py files, or a \.jsonl file"):
        find_source(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"holds no \.txt, \.md or \.py files: add some text files"):
        find_source(tmp_path / "empty")


def test_folder_of_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="contains no text"):
        plan_documents(find_source(tmp_path))


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl line 2 has no "text" string field: give every '
                                        r'line a JSON object such as'):
        plan_documents(find_source(path))
    path.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON .*: write one JSON object per"):
        plan_documents(find_source(path))


def test_corpus_too_small_for_a_window():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match=r"holds 10 tokens, fewer than one window of context \+ 1 = "
                                        r"17: use a larger corpus or a smaller context"):
        get_batch(tokens, 2, 16, np.random.default_rng(0))
    with pytest.raises(DataError, match="fewer than one window"):
        next(iter_eval_batches(tokens, 2, 16))


# ---- cached token files ----

def test_cache_is_reused_and_invalidated(folder, tok, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_data(folder, tokenizer=tok, cache_dir=cache)
    assert not first.cached and (first.folder / "tokenizer.json").exists()
    mtime = os.stat(first.folder / "train.bin").st_mtime_ns
    second = prepare_data(folder, tokenizer=tok, cache_dir=cache)
    assert second.cached and second.folder == first.folder
    assert os.stat(first.folder / "train.bin").st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and second.tokenizer.ranks == tok.ranks
    assert not any(p.name.endswith(".tmp") for p in first.folder.iterdir())

    (folder / "doc00.txt").write_text("a changed document\n")
    third = prepare_data(folder, tokenizer=tok, cache_dir=cache)
    assert not third.cached and third.folder != first.folder
    assert "a changed document\n" in _docs(third.train, tok) + _docs(third.val, tok)


def test_cache_dir_from_environment(folder, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MINPARCAE_CACHE", str(tmp_path / "envcache"))
    ds = prepare_data(folder, tokenizer=tok)
    assert ds.folder.parent == tmp_path / "envcache"


def test_tokenizer_trained_when_none_given(folder, tmp_path):
    ds = prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")
    assert ds.tokenizer.vocab_size == 300 and ds.meta["vocab_size"] == 300
    assert ds.train.dtype == np.uint16 and int(ds.train.max()) < 300
    again = prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.cached and again.tokenizer.fingerprint == ds.tokenizer.fingerprint


def test_dtype_follows_vocab_size(folder, tmp_path):
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    # Every 2-byte string as a token: 65,792 + 1 ids, and common pairs get ids above 65,535.
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({bytes([a, b]): 256 + 256 * a + b for a in range(256) for b in range(256)})
    big = Tokenizer.from_ranks("pairs", ranks)
    ds = prepare_data(folder, tokenizer=big, cache_dir=tmp_path / "cache")
    assert ds.meta["dtype"] == "uint32" and ds.train.dtype == np.uint32
    assert int(ds.train.max()) > 65535
    assert _docs(ds.train, big)[0] == (folder / "doc00.txt").read_text()


# ---- batches and the unigram baseline ----

@pytest.fixture
def counting_tokens(tmp_path):
    """A memmapped token file whose value at each position is the position itself."""
    path = tmp_path / "tokens.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def test_get_batch_windows(counting_tokens):
    B, T = 8, 32
    x, y = get_batch(counting_tokens, B, T, np.random.default_rng(0))
    x, y = backend.to_host(x), backend.to_host(y)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    for row_x, row_y in zip(x, y):
        start = row_x[0]  # the token value is its position, so it names the sampled offset
        assert np.array_equal(row_x, counting_tokens[start:start + T])
        assert np.array_equal(row_y, counting_tokens[start + 1:start + T + 1])
    assert x.min() >= 0 and y.max() <= len(counting_tokens) - 1
    x2, _ = get_batch(counting_tokens, B, T, np.random.default_rng(0))
    x3, _ = get_batch(counting_tokens, B, T, np.random.default_rng(1))
    assert np.array_equal(backend.to_host(x2), x) and not np.array_equal(backend.to_host(x3), x)


def test_get_batch_reaches_the_last_token():
    tokens = np.arange(6, dtype=np.uint16)
    _, y = get_batch(tokens, 50, 5, np.random.default_rng(0))  # only one window fits
    assert np.array_equal(backend.to_host(y), np.tile(np.arange(1, 6), (50, 1)))


def test_eval_batches_are_fixed_and_cover_the_file(counting_tokens):
    B, T = 4, 100
    batches = [tuple(map(backend.to_host, b)) for b in iter_eval_batches(counting_tokens, B, T)]
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert len(starts) == (5000 - 1) // T and starts[0] == 0 and starts[-1] == 5000 - T - 1
    assert np.all(np.diff(starts) >= T)  # non-overlapping
    assert all(np.array_equal(y, x + 1) for x, y in batches)
    again = [tuple(map(backend.to_host, b)) for b in iter_eval_batches(counting_tokens, B, T, 3)]
    assert len(again) == 3 and all(x.shape == (B, T) for x, _ in again)
    first_x, _ = next(iter_eval_batches(counting_tokens, B, T, 3))
    assert np.array_equal(again[0][0], backend.to_host(first_x))


def test_unigram_entropy_by_hand():
    train, val, V = np.array([0, 0, 1]), np.array([0, 1, 2]), 3
    p = [(2 + 1) / 6, (1 + 1) / 6, (0 + 1) / 6]  # add-one smoothing over N + V = 6
    assert unigram_entropy(train, V, val) == pytest.approx(-sum(math.log(q) for q in p) / 3)
    assert unigram_entropy(train, V) == pytest.approx(-(2 * math.log(p[0]) + math.log(p[1])) / 3)
    uniform = np.arange(1000) % 10
    assert unigram_entropy(uniform, 10) == pytest.approx(math.log(10), rel=1e-12)
