"""The BPE tokenizer: tiktoken encodes exactly the BPE trained here; text survives a round trip."""

import random
import sysconfig
from pathlib import Path

import pytest
import tiktoken

from minparcae.tokenizer import (ENDOFTEXT, Tokenizer, encode_slow, load_tokenizer,
                                 merges_from_ranks, train_bpe)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["textwrap.py", "argparse.py", "json/decoder.py", "string.py"]  # ~130 KB
VOCAB = 512


def _text(name):
    return (STDLIB / name).read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def corpus():
    return [_text(name) for name in TRAIN_FILES]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(corpus, VOCAB)


UNICODE_SAMPLES = [
    "hello world",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧‍👦 with zero-width joiners",
    "中文字符和日本語のテキスト, 한국어",
    "combining marks: e\u0301 a\u0308 n\u0303, Zalgo: Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    "tabs\tand\r\nwindows newlines\n\n\n   trailing spaces   ",
    "numbers 1234567890 3.14159 -42 1e-10",
    "",
    " ",
]


def _random_unicode(rng, n):
    """Random code points anywhere in Unicode except the surrogates (not encodable as UTF-8)."""
    chars = []
    while len(chars) < n:
        cp = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x80)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


def test_vocab_layout(tok):
    """256 bytes, then merges (ranks 0..n-1 without gaps), then <|endoftext|> as the last id."""
    assert tok.vocab_size == VOCAB
    assert sorted(tok.ranks.values()) == list(range(VOCAB - 1))
    assert all(tok.ranks[bytes([b])] == b for b in range(256))
    assert tok.eot_id == VOCAB - 1
    assert tok.decode([tok.eot_id]) == ENDOFTEXT


def test_tiktoken_equals_reference_bpe(tok, corpus):
    rng = random.Random(0)
    texts = UNICODE_SAMPLES + [corpus[0][:5000], _text("os.py")[:20000], _random_unicode(rng, 2000),
                               "aaaaaaaaaaaaaaaaaaaaaaaa" * 7, "\n" * 50 + " " * 33 + "x"]
    for text in texts:
        assert tok.encode(text) == encode_slow(text, tok.ranks)


def test_tiktoken_equals_reference_on_a_tiny_alphabet():
    """Few symbols and many merges: long tokens overlap in every way, the hardest case for the
    claim that tiktoken's concatenation rule and textbook merges agree."""
    rng = random.Random(1)
    words = lambda n, m: " ".join("".join(rng.choice("ab") for _ in range(rng.randint(2, m)))
                                  for _ in range(n))
    tok = train_bpe(words(3000, 14), 400)
    assert tok.vocab_size == 400
    for text in (words(300, 40), "a" * 100, "ab" * 50 + "ba" * 50):
        assert tok.encode(text) == encode_slow(text, tok.ranks)


def test_unicode_round_trip(tok):
    rng = random.Random(2)
    for text in UNICODE_SAMPLES + [_random_unicode(rng, 500) for _ in range(20)]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size - 1 for i in ids)
        assert tok.decode(ids) == text


def test_bytes_round_trip(tok):
    rng = random.Random(3)
    for n in (0, 1, 2, 7, 100, 3000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
    assert tok.decode_bytes(tok.encode_bytes(b"\xff\xfe caf\xc3")) == b"\xff\xfe caf\xc3"


def test_decode_replaces_broken_utf8(tok):
    ids = tok.encode_bytes("é".encode("utf-8")[:1])
    assert tok.decode(ids) == "\ufffd"


def test_special_token_text_is_ordinary_text(tok):
    text = f"one document{ENDOFTEXT}another"
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_training_is_deterministic(tok, corpus):
    again = train_bpe(corpus, VOCAB)
    assert again.ranks == tok.ranks
    assert again.fingerprint == tok.fingerprint


def test_merges_are_recoverable_from_ranks(tok):
    merges = merges_from_ranks(tok.ranks)
    assert len(merges) == VOCAB - 1 - 256
    tokens = sorted(tok.ranks, key=tok.ranks.get)
    assert all(tokens[a] + tokens[b] == tokens[new] for (a, b), new in merges.items())


def test_training_stops_when_no_pair_is_left():
    tok = train_bpe("abab", 1000)
    assert tok.vocab_size == 256 + 2 + 1  # merges "ab", then "abab", then <|endoftext|>
    assert tok.encode("abab") == [257]


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="ask for at least 257"):
        train_bpe("abc", 200)


def test_save_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.ranks == tok.ranks
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    assert loaded.fingerprint == tok.fingerprint
    text = _text("os.py")[:3000]
    assert loaded.encode(text) == tok.encode(text)
    assert Tokenizer.from_dict(tok.to_dict()).ranks == tok.ranks


def test_fingerprint_of_a_trained_tokenizer_is_stable(tmp_path):
    """Checkpoints and token caches store this hash, so it must not move when `to_dict` learns new
    layouts; and a folder holding a saved tokenizer.json loads too."""
    tok = train_bpe("abab", 1000, special_tokens=(ENDOFTEXT, "<|pad|>"))
    d = tok.to_dict()
    assert d["special_tokens"] == [ENDOFTEXT, "<|pad|>"] and None not in d["tokens"]
    assert tok.fingerprint == "bb13b3e69d2b61d6"
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")


def test_named_encoding_offline_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as info:
        load_tokenizer("gpt2")
    message = str(info.value)
    assert message == ("the tiktoken encoding 'gpt2' could not be loaded (no network or no cached "
                       "file), so leave the tokenizer unset to use the BPE tokenizer trained on "
                       "your data (the default).")
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_named_encoding_wrapped(monkeypatch, tok):
    """A named encoding gets the same interface and is saved by name (tiktoken is faked here, as
    the real one needs a download)."""
    fake = tiktoken.Encoding("gpt2", pat_str=tok.encoding._pat_str, mergeable_ranks=tok.ranks,
                             special_tokens={ENDOFTEXT: VOCAB - 1})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    named = load_tokenizer("gpt2")
    assert named.name == "gpt2" and named.eot_id == VOCAB - 1
    assert named.decode(named.encode("def f(x):")) == "def f(x):"
    assert named.to_dict() == {"tiktoken": "gpt2"}
    assert Tokenizer.from_dict(named.to_dict()).encoding is fake


def test_unknown_encoding_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        load_tokenizer("gpt5")
