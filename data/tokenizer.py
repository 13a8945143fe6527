"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, saved as one json file.

The split pattern is GPT-4's (cl100k). Five special tokens sit after the BPE vocabulary;
plain text can never turn into one of them (`encode` is tiktoken's `encode_ordinary`), so a
user typing "<|im_end|>" cannot end an assistant turn. A Hugging Face byte-level BPE
tokenizer.json (as export_hf.py writes) loads too.
"""
import base64
import hashlib
import json
import os
from typing import Iterable

import numpy as np
import tiktoken

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS, EOS, IM_START, IM_END, PAD = "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]
FORMAT = "muon-bpe-v1"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which Hugging Face vocabularies are written in: every byte
    as a printable character (printable ASCII and Latin-1 stand for themselves, the other 68
    bytes for U+0100 onwards), so a byte string can be a json key."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


BYTE_TO_UNICODE = _byte_to_unicode()


class Tokenizer:
    """A tiktoken.Encoding plus the ids of our special tokens and a fingerprint of the vocabulary."""

    def __init__(self, enc: tiktoken.Encoding, name: str):
        missing = [s for s in SPECIAL_TOKENS if s not in enc._special_tokens]
        if missing:
            raise ValueError(f"tokenizer {name!r} lacks special tokens {missing}")
        self.enc = enc
        self.name = name
        self.vocab_size = enc.n_vocab
        special = enc._special_tokens
        self.bos_id = special[BOS]
        self.eos_id = special[EOS]
        self.im_start_id = special[IM_START]
        self.im_end_id = special[IM_END]
        self.pad_id = special[PAD]
        self.fingerprint = _fingerprint(enc._pat_str, enc._mergeable_ranks, special)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """The length in UTF-8 bytes of every token id (0 for the special tokens): what turns a loss
        per token into bits per byte, a figure that tokenizers of any vocabulary share."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, rank in self.enc._mergeable_ranks.items():
            lengths[rank] = len(piece)
        return lengths

    def save(self, path: str) -> None:
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        doc = {
            "format": FORMAT,
            "name": self.enc.name,
            "pattern": self.enc._pat_str,
            "special_tokens": self.enc._special_tokens,
            "mergeable_ranks": [[base64.b64encode(b).decode("ascii"), r] for b, r in ranks],
        }
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def _fingerprint(pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(pattern.encode("utf-8"))
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(r.to_bytes(4, "little") + len(b).to_bytes(2, "little") + b)
    h.update(json.dumps(sorted(special.items())).encode("utf-8"))
    return h.hexdigest()[:16]


def _with_specials(name: str, pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> tiktoken.Encoding:
    special = dict(special)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for s in SPECIAL_TOKENS:  # add ours after everything the base vocabulary already uses
        if s not in special:
            special[s] = next_id
            next_id += 1
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `texts`. vocab_size counts the 5 special tokens; the result
    has fewer tokens only when the text runs out of pairs to merge."""
    import rustbpe

    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + specials), got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_bpe, pattern=SPLIT_PATTERN)
    ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    enc = _with_specials("trained", SPLIT_PATTERN, ranks, {})
    return Tokenizer(enc, name="trained")


def _hf_split_pattern(pre: dict | None) -> str:
    """The split regex of a byte-level pre-tokenizer: Split(regex) followed by a ByteLevel step
    without a regex of its own, as export_hf.py (and Qwen, Llama 3) write it."""
    steps = (pre or {}).get("pretokenizers", [pre])
    kinds = [step and step.get("type") for step in steps]
    if kinds != ["Split", "ByteLevel"]:
        raise ValueError(f"pre-tokenizer is {kinds}, expected [Split(regex), ByteLevel]")
    split, byte_level = steps
    if "Regex" not in split["pattern"] or split.get("behavior") != "Isolated" or split.get("invert"):
        raise ValueError(f"Split pre-tokenizer {split} is not an isolating regex split")
    if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        raise ValueError("ByteLevel pre-tokenizer must have use_regex and add_prefix_space off")
    return split["pattern"]["Regex"]


def _encoding_from_hf(doc: dict, name: str) -> tiktoken.Encoding:
    """tiktoken ranks from a Hugging Face byte-level BPE: a token's id is its rank. tiktoken
    merges the adjacent pair whose concatenation has the lowest rank, so the merges list must
    be in the order of the ids of the tokens it makes (any other order has no tiktoken twin)."""
    model = doc["model"]
    vocab = model["vocab"]
    if model.get("type") != "BPE":
        raise ValueError(f"model type is {model.get('type')!r}, expected 'BPE'")
    if doc.get("normalizer"):
        raise ValueError(f"it has a {doc['normalizer'].get('type')} normalizer, which tiktoken cannot apply")
    pattern = _hf_split_pattern(doc.get("pre_tokenizer"))
    added = doc.get("added_tokens", [])
    plain = [t["content"] for t in added if not t.get("special")]
    if plain:
        raise ValueError(f"added tokens {plain} are not special; tiktoken has no such tokens")
    special = {t["content"]: t["id"] for t in added}
    to_byte = {c: b for b, c in BYTE_TO_UNICODE.items()}
    ranks = {}
    for piece, rank in vocab.items():
        if piece in special:  # some vocabularies list their special tokens among the BPE tokens too
            continue
        if any(c not in to_byte for c in piece):
            raise ValueError(f"vocabulary entry {piece!r} is not written in the byte-level alphabet")
        ranks[bytes(to_byte[c] for c in piece)] = rank
    made = [vocab.get("".join(pair.split(" ") if isinstance(pair, str) else pair)) for pair in model["merges"]]
    if None in made or any(a > b for a, b in zip(made, made[1:])):
        raise ValueError("its merges are not in the order of the ids of the tokens they make")
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def load_tokenizer(path_or_name: str) -> Tokenizer:
    """Load our json file, a Hugging Face tokenizer.json with byte-level BPE (or a directory
    holding one), or a named tiktoken encoding ("gpt2", "cl100k_base") with our special tokens
    added on top. Named encodings must already be in tiktoken's local cache."""
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} (give a directory that holds a tokenizer.json)")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a tokenizer file ({e})") from None
        if isinstance(doc, dict) and "model" in doc and "format" not in doc:
            try:
                enc = _encoding_from_hf(doc, "hf")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}: not a byte-level BPE tokenizer that tiktoken can run ({e})") from None
            return Tokenizer(enc, name=path)
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            ranks = {base64.b64decode(b): r for b, r in doc["mergeable_ranks"]}
            enc = tiktoken.Encoding(doc.get("name", "trained"), pat_str=doc["pattern"],
                                    mergeable_ranks=ranks, special_tokens=doc["special_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a tokenizer file written by data/tokenizer.py ({e})") from None
        return Tokenizer(enc, name=path)
    if os.sep in path or path.endswith(".json"):
        raise FileNotFoundError(f"tokenizer file not found: {path} (run `python data/prepare.py` to create one)")
    if path not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {path!r}: give a tokenizer.json path "
                         f"or one of {tiktoken.list_encoding_names()}")
    try:
        base = tiktoken.get_encoding(path)
    except Exception as e:  # tiktoken downloads on first use; offline machines fail here
        raise RuntimeError(
            f"tiktoken could not load the {path!r} encoding ({type(e).__name__}). It downloads the "
            f"vocabulary on first use and caches it under $TIKTOKEN_CACHE_DIR; this machine seems to "
            f"be offline. Copy the cache from a machine that has it, or train our own tokenizer "
            f"(leave out --tokenizer)."
        ) from None
    enc = _with_specials(f"{path}+chat", base._pat_str, base._mergeable_ranks, base._special_tokens)
    return Tokenizer(enc, name=path)
