"""Byte-level BPE: trained here in plain Python, encoded by tiktoken.

A language model reads integers. Byte-pair encoding makes them: start from the 256 byte values (so
every string, indeed every byte string, can be written down), then repeatedly glue the most
frequent adjacent pair of tokens into a new token. Text is first cut into chunks by a GPT-style
regex (words with their leading space, runs of digits, punctuation, whitespace), and merges never
cross a chunk boundary, so " return" becomes one token but "x=" and "=y" never share one.

The vocabulary is: ids 0..255 the single bytes, then one id per merge in the order it was learned,
then the special tokens (`<|endoftext|>` last). The same list is a tiktoken `mergeable_ranks`
(bytes -> rank, rank == id), so tiktoken's Rust core encodes with it, two orders of magnitude faster
than Python.

Why the two agree. Training is textbook BPE: learn the most frequent adjacent pair (a, b) of the
current segmentations, give it the next id, replace its occurrences left to right, repeat; the
reference encoder `encode_slow` replays the merges in that order. tiktoken instead knows only the
ranks of byte strings: within a chunk it merges, again and again, the adjacent pair whose
*concatenation* has the lowest rank (leftmost on ties). The two rules give the same tokens because
of one invariant: in a fully merged segmentation, no run of two or more adjacent tokens spells a
known token. (Merges inside a run of whole tokens happen in the same order whether or not the run
has neighbours; each token, encoded alone, ends as itself; so a run that spelled a token would have
been merged into it.) Hence a new token t = a + b never sits next to a token it could glue onto,
no other pair (a', b') spells t, and the most frequent pair never spells an existing token, so the
ranks stay a bijection onto 0..n-1. A test checks tiktoken against `encode_slow`.

A byte-level BPE saved by the Hugging Face `tokenizers` library (a `tokenizer.json`, such as the one
the official Parcae models ship) converts to the same form: `Tokenizer.from_hf_json` decodes its
vocabulary from GPT-2's byte-to-character table back to bytes and keeps every id. Its ids need not
start with the bytes (Parcae's: `<|bos|>` 0, `<|eos|>` 1, `<|pad|>` 2, the 256 bytes 3..258 in the
order of their characters, then the merges), but tiktoken uses a token's id as its merge priority,
so the file must give merged tokens ids in merge order and pass the check behind `merges_from_ranks`
(each token, encoded with the merges before it, splits into the pair it is merged from). Parcae's
does; a file that does not is refused rather than encoded differently.
"""

import base64
import hashlib
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken
from tqdm import tqdm

# The GPT-4 (cl100k) pre-tokenisation pattern: contractions, a letter run with one optional leading
# non-letter, digit runs of at most three, punctuation runs with trailing newlines, whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
ENDOFTEXT = "<|endoftext|>"
EOS = "<|eos|>"  # the end-of-document token of Parcae's tokenizer, which has no <|endoftext|>


class Tokenizer:
    """Text <-> token ids, the same interface for a BPE trained here, one converted from a Hugging
    Face tokenizer.json and a named tiktoken encoding.

    `ranks` (bytes -> id) is given for a trained or converted tokenizer: it is what `to_dict` saves.
    A named encoding ("gpt2", "cl100k_base") is saved by name only."""

    def __init__(self, encoding, ranks=None):
        self.encoding = encoding
        self.ranks = ranks

    @classmethod
    def from_ranks(cls, name, ranks, pattern=GPT4_PATTERN, special_tokens=(ENDOFTEXT,)):
        """Build a tokenizer from ranks (bytes -> id). `special_tokens`: a dict {token: id}, or a
        sequence of tokens that take the ids after the ranks."""
        if not isinstance(special_tokens, dict):
            special_tokens = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special_tokens)
        return cls(encoding, ranks)

    @classmethod
    def from_hf_json(cls, path):
        """The byte-level BPE of a Hugging Face `tokenizer.json` (the file, or a folder holding
        it), with the ids the `tokenizers` library gives, special tokens included.

        Accepted is the layout of Parcae's tokenizer: a BPE model; no normalizer; a pre-tokenizer
        that is a Split on a regex (behavior Isolated) followed by ByteLevel with neither prefix
        space nor its own regex; a ByteLevel decoder; added tokens that are all special, with
        `<|endoftext|>` or `<|eos|>` among them. Two model options are accepted because they
        cannot change an id here: `byte_fallback` (every byte has a token, so nothing falls back)
        and `ignore_merges` (a chunk that is a whole token comes out as that token either way,
        which the merge check guarantees). Anything else is refused with the field that differs."""
        path, d = _read_tokenizer_json(path)
        return _from_hf(d, path)

    def to_hf_json(self, path):
        """Write this BPE as a Hugging Face `tokenizer.json` in the layout `from_hf_json` reads
        (the one the official Parcae code saves), which the `tokenizers` library encodes with the
        same ids: the vocabulary in GPT-2's byte-to-character spelling, the merges in id order,
        the split regex, and the special tokens as added tokens."""
        if self.ranks is None:
            raise ValueError(f"{self.name} is a named tiktoken encoding: only a BPE with its own "
                             "ranks can be written as tokenizer.json.")
        chars = _byte_chars()

        def spell(token):
            return "".join(chars[b] for b in token)

        merges = merges_from_ranks(self.ranks)
        by_id = {i: t for t, i in self.ranks.items()}
        specials = sorted(self.encoding._special_tokens.items(), key=lambda kv: kv[1])
        d = {"version": "1.0", "truncation": None, "padding": None,
             "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True}
                              for t, i in specials],
             "normalizer": None,
             "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                 {"type": "Split", "pattern": {"Regex": self.encoding._pat_str},
                  "behavior": "Isolated", "invert": False},
                 {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}]},
             "post_processor": None,
             "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                         "use_regex": True},
             "model": {"type": "BPE", "dropout": None, "unk_token": None,
                       "continuing_subword_prefix": None, "end_of_word_suffix": None,
                       "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                       "vocab": {spell(by_id[i]): i for i in sorted(by_id)},
                       "merges": [[spell(by_id[a]), spell(by_id[b])]
                                  for (a, b), _ in sorted(merges.items(), key=lambda kv: kv[1])]}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False)

    @property
    def name(self):
        return self.encoding.name

    @property
    def vocab_size(self):
        """Number of ids the model's embedding must hold (largest id + 1)."""
        return self.encoding.n_vocab

    @property
    def eot_id(self):
        """The id put between documents: `<|endoftext|>`, or `<|eos|>` in a tokenizer that has no
        `<|endoftext|>` (Parcae's)."""
        specials = self.encoding._special_tokens
        return specials.get(ENDOFTEXT, specials.get(EOS))

    def encode(self, text):
        """Token ids of ordinary text. A special-token string inside `text` (a file that mentions
        "<|endoftext|>") is encoded as the characters it is, so data can never forge one."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        """`encode` for many texts at once, on tiktoken's thread pool."""
        return self.encoding.encode_ordinary_batch(list(texts))

    def encode_bytes(self, data):
        """Token ids of arbitrary bytes (not necessarily UTF-8): byte-level BPE covers all 256."""
        return self.encoding._encode_bytes(bytes(data))

    def decode_bytes(self, ids):
        return self.encoding.decode_bytes(_ints(ids))

    def decode(self, ids):
        """Text of `ids`; a sequence that cuts a UTF-8 character in half shows U+FFFD there."""
        return self.encoding.decode(_ints(ids), errors="replace")

    def to_dict(self):
        """A JSON-serialisable description that `from_dict` turns back into an identical tokenizer,
        so a checkpoint can carry its tokenizer. `tokens[i]` is the token with id i in base64, None
        for a special token's id (or an unused one) below the last token. The special tokens are a
        list when they take the ids right after the tokens (a BPE trained here, and every older
        checkpoint), else a dict {token: id}."""
        if self.ranks is None:
            return {"tiktoken": self.name}
        tokens = [None] * (max(self.ranks.values()) + 1)
        for t, i in self.ranks.items():
            tokens[i] = base64.b64encode(t).decode("ascii")
        specials = dict(sorted(self.encoding._special_tokens.items(), key=lambda kv: kv[1]))
        if list(specials.values()) == list(range(len(self.ranks), self.vocab_size)):
            specials = list(specials)
        return {"name": self.name, "pattern": self.encoding._pat_str, "special_tokens": specials,
                "tokens": tokens}

    @classmethod
    def from_dict(cls, d):
        if "tiktoken" in d:
            return load_tokenizer(d["tiktoken"])
        ranks = {base64.b64decode(t): i for i, t in enumerate(d["tokens"]) if t is not None}
        return cls.from_ranks(d["name"], ranks, d["pattern"], d["special_tokens"])

    @property
    def fingerprint(self):
        """A short hash of `to_dict()`: equal fingerprints mean equal token ids for every text."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _ints(ids):
    """Ids from anywhere (a list, a NumPy or a CuPy array) as a list of Python ints for tiktoken."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def load_tokenizer(name_or_path):
    """A saved tokenizer: a .json file (minparcae's own, or a Hugging Face tokenizer.json, told
    apart by their contents), a folder holding a tokenizer.json, or a named tiktoken encoding
    ("gpt2", "cl100k_base", ...).

    Named encodings are downloaded by tiktoken on first use and cached; without network and
    without a cached copy they cannot load, and the error says so."""
    name = str(name_or_path)
    if name.endswith(".json") or Path(name).is_dir():
        path, d = _read_tokenizer_json(name)
        return _from_hf(d, path) if "model" in d else Tokenizer.from_dict(d)
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: pass a tokenizer .json file, a folder "
                         f"holding a tokenizer.json, or one of "
                         f"{', '.join(tiktoken.list_encoding_names())}.")
    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as e:
        raise RuntimeError(f"the tiktoken encoding {name!r} could not be loaded (no network or no "
                           "cached file), so leave the tokenizer unset to use the BPE tokenizer "
                           "trained on your data (the default).") from e


def _read_tokenizer_json(path):
    """(path, contents) of a tokenizer .json file, or of the tokenizer.json in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        with open(path, encoding="utf-8") as f:
            return path, json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} does not exist: pass the tokenizer.json "
                                "saved next to a prepared dataset, a Hugging Face tokenizer.json "
                                "or its folder, or a tiktoken encoding name.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON tokenizer file ({err}): pass a tokenizer.json "
                         "saved by minparcae or by the Hugging Face tokenizers library.") from None


def _byte_chars():
    """GPT-2's table {byte: character} by which byte-level BPE files write bytes as text: a byte
    that prints as itself in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stays, the other 68 (controls,
    space, DEL, NBSP, soft hyphen) take U+0100, U+0101, ... in byte order, so " the" is "Ġthe"."""
    keeps = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    moved = [b for b in range(256) if b not in keeps]
    return {b: chr(b) if b in keeps else chr(0x100 + moved.index(b)) for b in range(256)}


# Text with a character of every kind (letters, marks, digits, punctuation, symbols, every sort of
# whitespace, controls): a pre-tokenizer regex must match all of it, since tiktoken drops what no
# match covers, where the tokenizers library keeps it as a chunk of its own.
_PROBE = ("Hello, World! It's 2024: x_1=3.14e-5; don't\tstop\r\n\n  a\u00a0b\u2028c\u3000d "
          "café naïve e\u0301 中文字 日本語 한국어 🙂👍🏽 👨\u200d👩\u200d👧 \x00\x1b\x7f\x85 "
          "<|x|> ~`@#$%^&*()[]{}|\\/?<>¡¿§ ١٢٣ Ⅻ ½  \n")


def _hf_error(source, problem):
    return ValueError(f"{source} cannot be converted exactly: {problem}; use a byte-level BPE "
                      "tokenizer.json laid out like Parcae's, or leave the tokenizer unset to "
                      "train one on your data.")


def _kind(value):
    """What a component of tokenizer.json is, for an error message: its type, or its value."""
    return value.get("type", "set") if isinstance(value, dict) else repr(value)


def _from_hf(d, source):
    """The `Tokenizer` of a parsed Hugging Face tokenizer.json `d` (see `Tokenizer.from_hf_json`);
    `source` names the file in errors."""
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise _hf_error(source, f"model.type is {model.get('type')!r}, not 'BPE'")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _hf_error(source, f"model.{key} is {model[key]!r}")
    for key in ("normalizer", "truncation", "padding"):
        if d.get(key) is not None:
            raise _hf_error(source, f"{key} is {_kind(d[key])}, not null")
    if _kind(d.get("decoder")) != "ByteLevel":
        raise _hf_error(source, f"decoder is {_kind(d.get('decoder'))}, not ByteLevel")
    if d.get("post_processor") is not None and _kind(d["post_processor"]) != "ByteLevel":
        raise _hf_error(source, f"post_processor is {_kind(d['post_processor'])}, which adds "
                                "tokens around a text")
    pattern = _hf_pattern(d.get("pre_tokenizer"), source)

    specials = {}
    for k, added in enumerate(d.get("added_tokens") or []):
        content, i = added["content"], added["id"]
        if not added.get("special"):
            raise _hf_error(source, f"added_tokens[{k}] {content!r} is not special, so the "
                                    "tokenizers library cuts it out of ordinary text")
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise _hf_error(source, f"added_tokens[{k}] {content!r} strips spaces or matches "
                                    "whole words only")
        if content in specials or i in specials.values():
            raise _hf_error(source, f"added_tokens[{k}] {content!r} repeats a token or an id")
        specials[content] = i
    if ENDOFTEXT not in specials and EOS not in specials:
        raise _hf_error(source, f"added_tokens hold neither {ENDOFTEXT} nor {EOS}, one of which "
                                "minparcae puts between documents")

    vocab = model.get("vocab") or {}
    by_id = {i: s for s, i in vocab.items()}
    if len(by_id) != len(vocab):
        raise _hf_error(source, "model.vocab gives two tokens the same id")
    for content, i in specials.items():
        if by_id.get(i, content) != content:
            raise _hf_error(source, f"special token {content!r} has id {i}, which model.vocab "
                                    f"gives to {by_id[i]!r}")
    plain = {s: i for s, i in vocab.items() if i not in specials.values()}  # string -> id
    char_byte = {c: b for b, c in _byte_chars().items()}
    ranks = {}
    for s, i in plain.items():
        if not s or any(c not in char_byte for c in s):
            raise _hf_error(source, f"model.vocab token {s!r} (id {i}) is not written in "
                                    "byte-level characters")
        ranks[bytes(char_byte[c] for c in s)] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _hf_error(source, f"model.vocab lacks {len(missing)} of the 256 bytes (byte "
                                f"{missing[0]} first)")

    merges, last = {}, -1  # (id a, id b) -> id of a + b, as the file lists them
    for k, merge in enumerate(model.get("merges") or []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(p not in plain for p in pair) or "".join(pair) not in plain:
            raise _hf_error(source, f"model.merges[{k}] {merge!r} is not a pair of tokens of "
                                    "model.vocab whose merge is in model.vocab")
        new = plain["".join(pair)]
        if new <= last:
            raise _hf_error(source, f"model.merges[{k}] {merge!r} makes id {new} after a merge "
                                    f"made id {last}, so ids do not follow merge order")
        merges[plain[pair[0]], plain[pair[1]]] = last = new
    try:
        derived = merges_from_ranks(ranks)
    except ValueError as err:
        raise _hf_error(source, f"model.vocab {err}") from None
    made = {new: pair for pair, new in merges.items()}
    tokens = {i: t for t, i in ranks.items()}
    for pair, new in sorted(derived.items(), key=lambda kv: kv[1]):
        if new not in made:
            raise _hf_error(source, f"model.vocab token {new} ({tokens[new]!r}) is made by no "
                                    "merge of model.merges")
        if made[new] != pair:
            raise _hf_error(source, f"model.merges makes token {new} ({tokens[new]!r}) from the "
                                    f"pair {made[new]}, but the merges before it cut its bytes "
                                    f"into {pair}")

    name = f"hf-bpe-{max([*ranks.values(), *specials.values()]) + 1}"
    try:
        tok = Tokenizer.from_ranks(name, ranks, pattern, specials)
    except ValueError as err:
        raise _hf_error(source, f"the pre_tokenizer regex does not compile in tiktoken "
                                f"({err})") from None
    if tok.decode_bytes(tok.encode(_PROBE)) != _PROBE.encode("utf-8"):
        raise _hf_error(source, "the pre_tokenizer regex leaves some text unmatched")
    return tok


def _hf_pattern(pre, source):
    """The regex of a pre-tokenizer Sequence[Split(regex, Isolated), ByteLevel(no prefix space,
    no regex)], the only one accepted: tiktoken splits text by one regex, then works on bytes."""
    steps = pre.get("pretokenizers", []) if _kind(pre) == "Sequence" else [pre]
    kinds = [_kind(step) for step in steps]
    if kinds != ["Split", "ByteLevel"]:
        raise _hf_error(source, f"pre_tokenizer is {' + '.join(kinds)}, not Split + ByteLevel")
    split, byte_level = steps
    pattern = split.get("pattern")
    if not isinstance(pattern, dict) or "Regex" not in pattern:
        raise _hf_error(source, f"the pre_tokenizer Split pattern is {pattern!r}, not a regex")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise _hf_error(source, f"the pre_tokenizer Split has behavior {split.get('behavior')!r} "
                                f"and invert {split.get('invert')!r}, not Isolated and false")
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        raise _hf_error(source, "the pre_tokenizer ByteLevel adds a prefix space or splits by its "
                                "own regex")
    return pattern["Regex"]


def split_chunks(text, pattern=GPT4_PATTERN):
    """The pre-tokenisation chunks of `text`, as UTF-8 bytes (what tiktoken's regex step yields)."""
    return [m.encode("utf-8") for m in regex.findall(pattern, text)]


def _merge(ids, pair, new):
    """`ids` with every occurrence of `pair`, scanned left to right, replaced by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(text, vocab_size, name=None, pattern=GPT4_PATTERN, special_tokens=(ENDOFTEXT,)):
    """Learn a byte-level BPE with `vocab_size` ids in all (256 bytes + merges + special tokens).

    `text` is a string or an iterable of strings (documents; chunks never span two). BPE runs over
    the *unique* chunks weighted by their counts, which is a few percent of the text. Pair counts
    are updated incrementally: a merge only revisits the chunks that contain its pair (`where`), and
    a heap with lazy deletion finds the most frequent pair (ties: the smallest ids, so training is
    deterministic). Training stops early if no pair is left to merge."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        minimum = 256 + len(special_tokens)
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 byte tokens and "
                         f"{len(special_tokens)} special tokens: ask for at least {minimum}.")
    chunk_counts = Counter()
    for doc in [text] if isinstance(text, str) else text:
        chunk_counts.update(split_chunks(doc, pattern))
    words = [list(chunk) for chunk in chunk_counts]  # each unique chunk as byte ids
    counts = list(chunk_counts.values())

    tokens = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(tokens)}  # bytes -> id
    pair_counts, where = Counter(), defaultdict(set)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    for _ in tqdm(range(n_merges), desc="bpe merges", disable=None, leave=False):
        while heap and pair_counts[heap[0][1]] != -heap[0][0]:
            heapq.heappop(heap)  # stale entry: the pair's count changed since it was pushed
        if not heap:
            break
        a, b = heapq.heappop(heap)[1]
        new = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        ranks[tokens[new]] = new
        changed = set()
        for w in where.pop((a, b)):
            old = words[w]
            merged = _merge(old, (a, b), new)
            if merged == old:  # `where` is not pruned, so a chunk may no longer hold the pair
                continue
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= counts[w]
                changed.add(pair)
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += counts[w]
                where[pair].add(w)
                changed.add(pair)
            words[w] = merged
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    name = name or f"minparcae-bpe-{vocab_size}"
    return Tokenizer.from_ranks(name, ranks, pattern, special_tokens)


def _apply_merges(ids, merges):
    """Textbook BPE on one chunk: apply the learned merge with the lowest id present, repeat."""
    while len(ids) > 1:
        pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = _merge(ids, pair, merges[pair])
    return ids


def merges_from_ranks(ranks):
    """The merge list {(a, b): new id} behind `ranks`: each token longer than a byte, encoded with
    the merges of the tokens ranked before it, must come out as exactly two tokens, the pair it was
    made from. The single bytes may have any ids (a converted tokenizer's are not 0..255)."""
    byte_ids = [ranks[bytes([b])] for b in range(256)]
    merges = {}
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        parts = _apply_merges([byte_ids[b] for b in token], merges)
        if len(parts) != 2:
            raise ValueError(f"token {ranks[token]} ({token!r}) is not a merge of two earlier "
                             "tokens")
        merges[tuple(parts)] = ranks[token]
    return merges


def encode_slow(text, ranks, pattern=GPT4_PATTERN):
    """Reference encoder in pure Python: the regex split, then textbook BPE (merges replayed in
    training order) on each chunk's bytes. Slow; it shows that tiktoken's encoding with our ranks
    is exactly the BPE that was trained."""
    merges = merges_from_ranks(ranks)
    byte_ids = [ranks[bytes([b])] for b in range(256)]
    out = []
    for chunk in split_chunks(text, pattern):
        out.extend(_apply_merges([byte_ids[b] for b in chunk], merges))
    return out
