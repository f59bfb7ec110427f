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
"""

import base64
import hashlib
import heapq
import json
from collections import Counter, defaultdict

import regex
import tiktoken
from tqdm import tqdm

# The GPT-4 (cl100k) pre-tokenisation pattern: contractions, a letter run with one optional leading
# non-letter, digit runs of at most three, punctuation runs with trailing newlines, whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids, the same interface for a BPE trained here and a named tiktoken encoding.

    `ranks` (bytes -> id) is given for a trained tokenizer: it is what `to_dict` saves. A named
    encoding ("gpt2", "cl100k_base") is saved by name only."""

    def __init__(self, encoding, ranks=None):
        self.encoding = encoding
        self.ranks = ranks

    @classmethod
    def from_ranks(cls, name, ranks, pattern=GPT4_PATTERN, special_tokens=(ENDOFTEXT,)):
        """Build a tokenizer from learned ranks; the special tokens take the ids after them."""
        specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=specials)
        return cls(encoding, ranks)

    @property
    def name(self):
        return self.encoding.name

    @property
    def vocab_size(self):
        """Number of ids the model's embedding must hold (largest id + 1)."""
        return self.encoding.n_vocab

    @property
    def eot_id(self):
        return self.encoding.eot_token

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
        """A JSON-serialisable description (tokens as base64, in rank order) that `from_dict`
        turns back into an identical tokenizer, so a checkpoint can carry its tokenizer."""
        if self.ranks is None:
            return {"tiktoken": self.name}
        tokens = sorted(self.ranks, key=self.ranks.get)
        specials = sorted(self.encoding.special_tokens_set, key=self.encoding.encode_single_token)
        return {"name": self.name, "pattern": self.encoding._pat_str, "special_tokens": specials,
                "tokens": [base64.b64encode(t).decode("ascii") for t in tokens]}

    @classmethod
    def from_dict(cls, d):
        if "tiktoken" in d:
            return load_tokenizer(d["tiktoken"])
        ranks = {base64.b64decode(t): i for i, t in enumerate(d["tokens"])}
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
    """A saved tokenizer (.json path) or a named tiktoken encoding ("gpt2", "cl100k_base", ...).

    Named encodings are downloaded by tiktoken on first use and cached; without network and
    without a cached copy they cannot load, and the error says so."""
    name = str(name_or_path)
    if name.endswith(".json"):
        try:
            return Tokenizer.load(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {name} does not exist: pass the "
                                    "tokenizer.json saved next to a prepared dataset, or a "
                                    "tiktoken encoding name.") from None
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: pass a saved tokenizer .json file or one of "
                         f"{', '.join(tiktoken.list_encoding_names())}.")
    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as e:
        raise RuntimeError(f"the tiktoken encoding {name!r} could not be loaded (no network or no "
                           "cached file), so leave the tokenizer unset to use the BPE tokenizer "
                           "trained on your data (the default).") from e


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
    """The merge list {(a, b): new id} behind `ranks`: each token, encoded with the merges before
    it, must come out as exactly two tokens, the pair it was made from."""
    tokens = sorted(ranks, key=ranks.get)
    merges = {}
    for new in range(256, len(tokens)):
        parts = _apply_merges(list(tokens[new]), merges)
        if len(parts) != 2:
            raise ValueError(f"token {new} ({tokens[new]!r}) is not a merge of two earlier tokens")
        merges[tuple(parts)] = new
    return merges


def encode_slow(text, ranks, pattern=GPT4_PATTERN):
    """Reference encoder in pure Python: the regex split, then textbook BPE (merges replayed in
    training order) on each chunk's bytes. Slow; it shows that tiktoken's encoding with our ranks
    is exactly the BPE that was trained."""
    merges = merges_from_ranks(ranks)
    out = []
    for chunk in split_chunks(text, pattern):
        out.extend(_apply_merges(list(chunk), merges))
    return out
