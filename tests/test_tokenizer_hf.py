"""A Hugging Face tokenizer.json converted to tiktoken gives exactly the ids the tokenizers library
gives, and a file it could not reproduce is refused.

The tokenizer under test is trained here the way Parcae's was: a byte-level BPE whose pre-tokenizer
is a Split on a GPT-4-style regex (digit runs of at most two) followed by ByteLevel without its own
regex, the special tokens <|bos|> <|eos|> <|pad|> first, then the 256 byte characters."""

import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer import _random_unicode

from minparcae import checkpoint
from minparcae.tokenizer import EOS, Tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

PARCAE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
VOCAB = 600
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _text(name):
    return (STDLIB / name).read_text(encoding="utf-8", errors="replace")




SAMPLES = [
    ("The quick brown fox jumps over the lazy dog. It's what we'd've done; THEY'RE sure I'LL "
     "see you're right. Don't shout: 'single' and \"double\" quotes, an em dash — and an "
     "ellipsis…"),
    ('def mean(xs):\n    """Average of xs."""\n    return sum(xs) / len(xs)  # 3.14159\n\n'
     "\tif x <= 0x1F and y != -1_000:\n\t\tz += [1, 22, 333, 4444, 55555]\r\n"),
    "digits 0 12 345 6789 1234567890 3.14 -2.5e-10 ٣٤٥ ²³ ½ Ⅻ 2024-01-31T23:59:59Z",
    "emoji 🙂👍🏽 a family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 and 🧪",
    "中文字符和日本語のテキスト、한국어 문장. Ελληνικά, русский текст, עברית, العربية",
    "combining e\u0301 a\u0308 n\u0303 and Zalgo Z\u0351\u0352a\u0354l\u0355g\u0356o",
    "runs of whitespace:   three,\t\ttabs, \u00a0nbsp\u3000ideographic\n\n\n   \n\t\n  trailing   ",
    "\r\n\r\nwindows lines\r\n  indented\r\n\u2028line separator\u2029paragraph\x0b\x0c end",
    "controls \x00\x01\x1b[31m red \x7f\x85 and a soft\u00adhyphen",
    "the special tokens as text: <|bos|>hello<|eos|> <|pad|><|pad|> and <|eos|>\n<|bos|>",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A tokenizer.json trained like Parcae's, on a little English, code and Unicode."""
    pre = tokenizers.pre_tokenizers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True, unk_token=None,
                                                     fuse_unk=False))
    bpe.pre_tokenizer = pre.Sequence([
        pre.Split(pattern=tokenizers.Regex(PARCAE_PATTERN), behavior="isolated", invert=False),
        pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                             min_frequency=0,
                                             initial_alphabet=pre.ByteLevel.alphabet(),
                                             special_tokens=SPECIALS)
    corpus = [_text("textwrap.py"), _text("string.py")] + SAMPLES * 20
    bpe.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("parcae_tokenizer") / "tokenizer.json"
    bpe.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(hf_path):
    return Tokenizer.from_hf_json(hf_path)


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    return SAMPLES + ["".join(SAMPLES), _text("textwrap.py")[:4000], _text("os.py")[:8000],
                      _random_unicode(rng, 3000)]


def _hf(path, specials_as_text=False):
    """The tokenizers library's own tokenizer for `path`; with `specials_as_text`, a special
    token's text inside the input is encoded as ordinary text, as minparcae's `encode` does."""
    bpe = tokenizers.Tokenizer.from_file(str(path))
    bpe.encode_special_tokens = specials_as_text
    return bpe


def test_parcae_layout(tok, hf_path):
    """Special tokens first, the bytes next (not at ids 0..255), merges after, no gaps."""
    bpe = _hf(hf_path)
    assert tok.vocab_size == bpe.get_vocab_size() == VOCAB
    assert tok.encoding._special_tokens == {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2}
    assert sorted(tok.ranks.values()) == list(range(3, VOCAB))
    assert sorted(tok.ranks[bytes([b])] for b in range(256)) == list(range(3, 259))
    assert tok.ranks[b"!"] == 3  # the bytes in the order of their characters: "!" first,
    assert tok.ranks[b"\x00"] == 3 + 188  # "Ā" (byte 0) after the 188 printable ones
    assert tok.eot_id == bpe.token_to_id(EOS) == 1


def test_ids_equal_tokenizers(tok, hf_path, texts):
    plain, special = _hf(hf_path, specials_as_text=True), _hf(hf_path)
    assert sum(len(t.encode("utf-8")) for t in texts) > 20_000
    for text in texts:
        ids = tok.encode(text)
        assert ids == plain.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text == plain.decode(ids)
        with_specials = tok.encoding.encode(text, allowed_special="all")
        assert with_specials == special.encode(text, add_special_tokens=False).ids
        assert tok.decode(with_specials) == text
    assert tok.encode_batch(texts) == [e.ids for e in plain.encode_batch(texts,
                                                                         add_special_tokens=False)]
    marked = tok.encoding.encode(SAMPLES[9], allowed_special="all")
    assert marked.count(1) == 2 and marked.count(0) == 2 and marked.count(2) == 2
    assert not {0, 1, 2} & set(tok.encode(SAMPLES[9]))


def test_ignore_merges_changes_no_id(tok, hf_path, texts, tmp_path):
    """With ignore_merges a chunk that is a whole token is looked up, not merged; the merge check
    guarantees both give that token, so such files convert to the same tiktoken encoding."""
    d = json.loads(hf_path.read_text(encoding="utf-8"))
    d["model"]["ignore_merges"] = True
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    plain = _hf(path, specials_as_text=True)
    assert Tokenizer.from_hf_json(path).fingerprint == tok.fingerprint
    for text in texts:
        assert tok.encode(text) == plain.encode(text, add_special_tokens=False).ids


def test_round_trip_through_a_checkpoint(tok, tmp_path, texts):
    """Specials keep their explicit ids in `to_dict`; the dict survives JSON and a checkpoint."""
    d = tok.to_dict()
    assert d["special_tokens"] == {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2}
    assert d["tokens"][:3] == [None, None, None] and None not in d["tokens"][3:]
    checkpoint.save(tmp_path / "ckpt.npz", {"wte": np.zeros((2, 2))}, {},
                    {"tokenizer": d, "tokenizer_fingerprint": tok.fingerprint})
    _, _, meta = checkpoint.load(tmp_path / "ckpt.npz")
    again = Tokenizer.from_dict(meta["tokenizer"])
    assert meta["tokenizer_fingerprint"] == again.fingerprint == tok.fingerprint
    assert again.ranks == tok.ranks and again.eot_id == 1 and again.vocab_size == VOCAB
    assert again.encoding._special_tokens == tok.encoding._special_tokens
    for text in texts:
        assert again.encode(text) == tok.encode(text)
        assert again.encoding.encode(text, allowed_special="all") == \
            tok.encoding.encode(text, allowed_special="all")
    tok.save(tmp_path / "saved.json")  # minparcae's own format, as a prepared dataset keeps it
    assert load_tokenizer(tmp_path / "saved.json").fingerprint == tok.fingerprint


def test_load_tokenizer_takes_the_file_or_its_folder(tok, hf_path, tmp_path):
    assert load_tokenizer(hf_path).fingerprint == tok.fingerprint
    assert load_tokenizer(hf_path.parent).fingerprint == tok.fingerprint
    assert load_tokenizer(str(hf_path.parent)).ranks == tok.ranks
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a JSON tokenizer file"):
        load_tokenizer(tmp_path)


def test_both_merges_formats(tok, hf_path, tmp_path):
    """Merges are "a b" strings in older files and [a, b] pairs in newer ones."""
    d = json.loads(hf_path.read_text(encoding="utf-8"))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in d["model"]["merges"]]
    for merges in (pairs, [" ".join(p) for p in pairs]):
        d["model"]["merges"] = merges
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(d), encoding="utf-8")
        converted = load_tokenizer(path)
        assert converted.ranks == tok.ranks and converted.fingerprint == tok.fingerprint
        assert converted.encode(SAMPLES[1]) == _hf(path).encode(SAMPLES[1]).ids


# Each case: how a correct file is damaged, and the words the refusal must contain.
def _merged(merge):
    """The token a merge makes, from either form ("a b" or [a, b])."""
    return "".join(merge.split(" ") if isinstance(merge, str) else merge)


def _wordpiece(d):
    d["model"] = {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}


def _ids_out_of_merge_order(d):
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    a, b = _merged(merges[0]), _merged(merges[1])
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _merge_not_in_vocab(d):
    del d["model"]["vocab"][_merged(d["model"]["merges"][-1])]


def _token_without_merge(d):
    d["model"]["merges"].pop()


def _missing_byte(d):
    del d["model"]["vocab"]["Ā"]  # the character of byte 0


def _no_eos(d):
    d["added_tokens"][1]["content"] = "<|end|>"
    d["model"]["vocab"]["<|end|>"] = d["model"]["vocab"].pop(EOS)


def _special_on_a_plain_id(d):
    d["added_tokens"][2]["id"] = 300


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def damage(d):
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value
    return damage


def _pre(i, key, value):
    return _set("pre_tokenizer", "pretokenizers", i, key, value)


REFUSALS = [
    (_wordpiece, "model.type is 'WordPiece'"),
    (_set("normalizer", {"type": "NFC"}), "normalizer is NFC"),
    (_set("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": True}), "pre_tokenizer is ByteLevel"),
    (_pre(0, "behavior", "Removed"), "behavior 'Removed'"),
    (_pre(0, "pattern", {"String": " "}), "not a regex"),
    (_pre(0, "pattern", {"Regex": r"\p{L}+"}), "leaves some text unmatched"),
    (_pre(1, "add_prefix_space", True), "prefix space"),
    (_pre(1, "use_regex", True), "own regex"),
    (_set("decoder", None), "decoder is None"),
    (_set("post_processor", {"type": "TemplateProcessing"}), "post_processor is Template"),
    (_set("model", "dropout", 0.1), "model.dropout is 0.1"),
    (_set("model", "continuing_subword_prefix", "##"), "model.continuing_subword_prefix"),
    (_set("model", "end_of_word_suffix", "</w>"), "model.end_of_word_suffix"),
    (_set("added_tokens", 2, "special", False), "is not special"),
    (_set("added_tokens", 0, "lstrip", True), "strips spaces"),
    (_no_eos, "neither <|endoftext|> nor <|eos|>"),
    (_special_on_a_plain_id, "which model.vocab gives to"),
    (_missing_byte, "lacks 1 of the 256 bytes (byte 0 first)"),
    (_ids_out_of_merge_order, "ids do not follow merge order"),
    (_merge_not_in_vocab, "whose merge is in model.vocab"),
    (_token_without_merge, "is made by no merge"),
]


@pytest.mark.parametrize("damage, words", REFUSALS, ids=[w for _, w in REFUSALS])
def test_unsupported_files_are_refused(hf_path, tmp_path, damage, words):
    d = json.loads(hf_path.read_text(encoding="utf-8"))
    damage(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert words in message
    assert message.startswith(f"{path} cannot be converted exactly: ")
    assert message.endswith("; use a byte-level BPE tokenizer.json laid out like Parcae's, or leave "
                            "the tokenizer unset to train one on your data.")


def test_merge_that_bpe_would_not_make_is_refused(hf_path, tmp_path):
    """Bytes x, y, z with the merges (x y), (y z), then (x yz): BPE on the bytes xyz merges xy
    first and never reaches xyz, which the tokenizers library confirms, while tiktoken, ranking by
    id, would find xyz whole. Such a file is refused rather than encoded differently."""
    d = json.loads(hf_path.read_text(encoding="utf-8"))
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    x, y, z = "\u010e", "\u010f", "\u0110"  # how the file writes the bytes 0x0e, 0x0f, 0x10
    for i, (a, b) in enumerate([(x, y), (y, z), (x, y + z)]):
        vocab[a + b] = VOCAB + i
        merges.append([a, b])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    assert _hf(path).encode("\x0e\x0f\x10").ids == [VOCAB, vocab[z]]
    expected = (f"model.merges makes token {VOCAB + 2} (b'\\x0e\\x0f\\x10') from the pair "
                f"({vocab[x]}, {VOCAB + 1}), but the merges before it cut its bytes into "
                f"({VOCAB}, {vocab[z]})")
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_tokenizer(path)
