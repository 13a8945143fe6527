"""Prepare training data in one directory: tokenizer.json, train.bin/val.bin token files,
SFT/DPO jsonl splits, and meta.json describing them.

    python data/prepare.py                                   # embedded corpus -> data/embedded
    python data/prepare.py --pretrain_path P [--sft_path S] [--dpo_path D] --out_dir O

Everything is built in a temporary directory and moved in only once all of it succeeded;
meta.json is moved last, so its presence means "complete" (ensure_prepared relies on that).
"""
import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:  # `python data/prepare.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data.loaders import token_dtype
from data.readers import DataError, read_dpo_jsonl, read_pretrain_texts, read_sft_jsonl
from data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

CHAT_FILES = tuple(f"{kind}_{split}.jsonl" for kind in ("sft", "dpo") for split in ("train", "val", "test"))
PREPARED_FILES = ("tokenizer.json", "train.bin", "val.bin", *CHAT_FILES)  # meta.json goes last
DEFAULT_TOKENIZER_MAX_CHARS = 200_000_000
ENCODE_CHUNK = 1024  # documents per tiktoken batch call


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


@contextlib.contextmanager
def _staged(out_dir: str):
    """Yield an empty temp dir next to out_dir; on success move its files into out_dir."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    meta = os.path.join(out_dir, "meta.json")
    # Without meta.json the directory counts as unprepared, so a crash while moving files below
    # leads to a fresh prepare, never to a mix of old and new files being trained on.
    if os.path.exists(meta):
        os.remove(meta)
    for name in PREPARED_FILES:
        src, dst = os.path.join(tmp, name), os.path.join(out_dir, name)
        if os.path.exists(src):
            os.replace(src, dst)
        elif os.path.exists(dst):  # left from an earlier prepare with other inputs
            os.remove(dst)
    os.replace(os.path.join(tmp, "meta.json"), meta)  # same filesystem: rename is atomic


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _get_tokenizer(tokenizer, texts, vocab_size: int, max_chars: int, quiet: bool) -> Tokenizer:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        _say(quiet, f"using tokenizer {tok.name} (vocab_size {tok.vocab_size})")
        return tok

    def capped():
        n, last = 0, time.time()
        for t in texts:
            yield t
            n += len(t)
            if n >= max_chars:
                return
            if time.time() - last > 5:
                last = time.time()
                _say(quiet, f"  {n / 1e6:,.1f}M chars read, {n / 1e6 / (last - t0):,.1f}M chars/s")

    t0 = time.time()
    _say(quiet, f"training a BPE tokenizer, vocab_size {vocab_size} (on at most {max_chars / 1e6:.0f}M chars)...")
    tok = train_tokenizer(capped(), vocab_size)
    note = "" if tok.vocab_size == vocab_size else f" (the text ran out of merges before {vocab_size})"
    _say(quiet, f"  tokenizer trained in {time.time() - t0:.1f}s: vocab_size {tok.vocab_size}{note}")
    return tok


def _write_bins(tok: Tokenizer, labeled_docs, out: str, num_threads: int, quiet: bool) -> dict:
    """Tokenize (split, text) pairs into out/train.bin and out/val.bin, each document followed
    by eos. Returns token and document counts per split."""
    dtype = token_dtype(tok.vocab_size)
    counts = {"train_tokens": 0, "val_tokens": 0, "train_docs": 0, "val_docs": 0}
    t0 = last = time.time()
    n_chars = 0
    with open(os.path.join(out, "train.bin"), "wb") as ftrain, open(os.path.join(out, "val.bin"), "wb") as fval:
        files = {"train": ftrain, "val": fval}

        def flush(chunk):
            nonlocal n_chars
            by_split = {"train": [], "val": []}
            for (split, text), doc in zip(chunk, tok.encode_batch([t for _, t in chunk], num_threads)):
                by_split[split] += doc
                by_split[split].append(tok.eos_id)
                counts[f"{split}_tokens"] += len(doc) + 1
                counts[f"{split}_docs"] += 1
                n_chars += len(text)
            for split, ids in by_split.items():
                files[split].write(np.asarray(ids, dtype=dtype).tobytes())

        chunk = []
        for item in labeled_docs:
            chunk.append(item)
            if len(chunk) == ENCODE_CHUNK:
                flush(chunk)
                chunk = []
                if time.time() - last > 5:
                    last = time.time()
                    docs = counts["train_docs"] + counts["val_docs"]
                    _say(quiet, f"  {docs:,} docs, {n_chars / 1e6:,.1f}M chars, "
                                f"{(counts['train_tokens'] + counts['val_tokens']) / 1e6:,.2f}M tokens, "
                                f"{docs / (last - t0):,.0f} docs/s")
        if chunk:
            flush(chunk)
    if counts["train_docs"] == 0 or counts["val_docs"] == 0:
        raise DataError(f"pretraining text has {counts['train_docs'] + counts['val_docs']} document(s); "
                        f"need at least 2 (one goes to val.bin)")
    dt = time.time() - t0
    total = counts["train_tokens"] + counts["val_tokens"]
    _say(quiet, f"  train.bin {counts['train_tokens']:,} tokens ({counts['train_docs']:,} docs), "
                f"val.bin {counts['val_tokens']:,} tokens ({counts['val_docs']:,} docs); "
                f"{total / max(dt, 1e-9):,.0f} tokens/s")
    return counts


def _meta(tok: Tokenizer, counts: dict, chat_counts: dict, source: dict) -> dict:
    return {
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name,
        **counts,
        "tokenizer": "tokenizer.json",
        "tokenizer_name": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        **chat_counts,
        "source": source,
    }


def corpus_fingerprint() -> str:
    """A hash of data/corpus.py's source, recorded in an embedded corpus's meta.json. Any edit to
    the generator changes it (a version number to bump by hand could be forgotten); a stale
    corpus costs a few seconds to regenerate, training on one costs a wrong result."""
    from data import corpus

    with open(corpus.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def prepare_default(out_dir: str = "data/embedded", vocab_size: int = 4096, seed: int = 1337,
                    quiet: bool = False, tokenizer: str | None = None, num_threads: int | None = None,
                    **corpus_kwargs) -> str:
    """Generate the embedded corpus (data.corpus.build_corpus(seed, **corpus_kwargs), e.g.
    n_stories=200 for a tiny one) and prepare it into out_dir. Returns out_dir."""
    from data.corpus import build_corpus

    t0 = time.time()
    corpus = build_corpus(seed=seed, **corpus_kwargs)
    pre = corpus["pretrain"]
    _say(quiet, f"generated the embedded corpus in {time.time() - t0:.1f}s: {len(pre['train']):,} train "
                f"and {len(pre['val']):,} val stories, "
                + ", ".join(f"{len(corpus[k]['train']):,} {k.upper()} train" for k in ("sft", "dpo")))
    with _staged(out_dir) as tmp:
        tok = _get_tokenizer(tokenizer, pre["train"], vocab_size, DEFAULT_TOKENIZER_MAX_CHARS, quiet)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        labeled = [("train", t) for t in pre["train"]] + [("val", t) for t in pre["val"]]
        counts = _write_bins(tok, labeled, tmp, num_threads or _threads(), quiet)
        chat_counts = {}
        for kind in ("sft", "dpo"):
            for split, records in corpus[kind].items():
                _write_jsonl(os.path.join(tmp, f"{kind}_{split}.jsonl"), records)
            chat_counts[kind] = {split: len(records) for split, records in corpus[kind].items()}
        sizes = inspect.signature(build_corpus).bind(seed=seed, **corpus_kwargs)
        sizes.apply_defaults()
        source = {"kind": "embedded", "corpus_fingerprint": corpus_fingerprint(), "vocab_size": vocab_size,
                  "tokenizer": tokenizer, **sizes.arguments}
        _write_json(os.path.join(tmp, "meta.json"), _meta(tok, counts, chat_counts, source))
    _say(quiet, f"prepared {out_dir} in {time.time() - t0:.1f}s")
    return out_dir


def _chat_splits(read, kind: str, path: str, val_path: str | None, seed: int, quiet: bool) -> dict:
    """{"train": records, "val": records}; without val_path about 1% (1 to 1000) is split off."""
    records = read(path)
    if val_path is not None:
        return {"train": records, "val": read(val_path)}
    if len(records) < 2:
        raise DataError(f"{path}: has {len(records)} record; need at least 2 to split off a "
                        f"validation set (or pass --{kind}_val_path)")
    n_val = min(1000, max(1, len(records) // 100))
    is_val = np.zeros(len(records), dtype=bool)
    is_val[np.random.default_rng(seed).choice(len(records), n_val, replace=False)] = True
    _say(quiet, f"{path}: {len(records):,} {kind.upper()} records, {n_val:,} split off for val")
    return {"train": [r for r, v in zip(records, is_val) if not v],
            "val": [r for r, v in zip(records, is_val) if v]}


def prepare_files(out_dir: str, pretrain_path: str | None = None, sft_path: str | None = None,
                  dpo_path: str | None = None, sft_val_path: str | None = None,
                  dpo_val_path: str | None = None, vocab_size: int = 4096, tokenizer: str | None = None,
                  val_every: int = 200, tokenizer_max_chars: int = DEFAULT_TOKENIZER_MAX_CHARS,
                  seed: int = 1337, num_threads: int | None = None, quiet: bool = False) -> str:
    """Prepare real data files into out_dir. Pretraining documents 0, val_every, 2*val_every, ...
    (about 0.5% by default, always at least one) go to val.bin. SFT/DPO files are validated
    and rewritten normalised ({"conversations": ...} / {"chosen", "rejected"} message lists)."""
    if pretrain_path is None and tokenizer is None:
        raise DataError("without --pretrain_path there is no text to train a tokenizer on; "
                        "pass --tokenizer (a tokenizer.json or gpt2)")
    if pretrain_path is None and sft_path is None and dpo_path is None:
        raise DataError("nothing to prepare: pass --pretrain_path, --sft_path and/or --dpo_path")
    t0 = time.time()
    # Chat data first: it is read whole and fails fast, before the long tokenization pass.
    chat = {}
    if sft_path is not None:
        chat["sft"] = _chat_splits(read_sft_jsonl, "sft", sft_path, sft_val_path, seed, quiet)
    if dpo_path is not None:
        chat["dpo"] = _chat_splits(read_dpo_jsonl, "dpo", dpo_path, dpo_val_path, seed, quiet)
    with _staged(out_dir) as tmp:
        texts = read_pretrain_texts(pretrain_path) if pretrain_path is not None else []
        tok = _get_tokenizer(tokenizer, texts, vocab_size, tokenizer_max_chars, quiet)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        counts = {}
        if pretrain_path is not None:
            _say(quiet, f"tokenizing {pretrain_path} (every {val_every}th document to val)...")
            labeled = (("val" if i % val_every == 0 else "train", t)
                       for i, t in enumerate(read_pretrain_texts(pretrain_path)))
            counts = _write_bins(tok, labeled, tmp, num_threads or _threads(), quiet)
        chat_counts = {}
        for kind, splits in chat.items():
            for split, records in splits.items():
                _write_jsonl(os.path.join(tmp, f"{kind}_{split}.jsonl"), records)
            chat_counts[kind] = {split: len(records) for split, records in splits.items()}
        source = {"kind": "files", "pretrain_path": pretrain_path, "sft_path": sft_path,
                  "sft_val_path": sft_val_path, "dpo_path": dpo_path, "dpo_val_path": dpo_val_path,
                  "val_every": val_every, "seed": seed}
        _write_json(os.path.join(tmp, "meta.json"), _meta(tok, counts, chat_counts, source))
    _say(quiet, f"prepared {out_dir} in {time.time() - t0:.1f}s")
    return out_dir


def ensure_prepared(out_dir: str = "data/embedded", **kwargs) -> str:
    """Prepare the embedded default into out_dir unless its meta.json says it is there already,
    generated by the current data/corpus.py. One generated by other corpus code is regenerated
    with the arguments it was made with (kwargs override them); a directory prepared from files
    is left alone. In a multi-process run call it on rank 0 and barrier before the other ranks
    read the data."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        print(f"preparing the embedded default data in {out_dir} (first run only)...", flush=True)
        return prepare_default(out_dir, **kwargs)
    with open(meta_path, encoding="utf-8") as f:
        source = json.load(f).get("source", {})
    if source.get("kind") != "embedded" or source.get("corpus_fingerprint") == corpus_fingerprint():
        return out_dir
    print(f"{out_dir} was generated by another version of data/corpus.py; regenerating it...", flush=True)
    made_with = {k: v for k, v in source.items() if k not in ("kind", "corpus_fingerprint")}
    return prepare_default(out_dir, **{**made_with, **kwargs})


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="output directory (default data/embedded; required with data paths)")
    p.add_argument("--vocab_size", type=int, default=4096, help="tokenizer size to train, special tokens included")
    p.add_argument("--tokenizer", default=None,
                   help="use this tokenizer.json or tiktoken name (gpt2) instead of training one")
    p.add_argument("--seed", type=int, default=1337)
    real = p.add_argument_group("real data (leave out for the embedded default corpus)")
    real.add_argument("--pretrain_path", default=None, help=".txt/.jsonl/.parquet file or a directory of them")
    real.add_argument("--sft_path", default=None, help="SFT jsonl (conversations/messages)")
    real.add_argument("--sft_val_path", default=None, help="SFT validation jsonl (default: ~1%% of --sft_path)")
    real.add_argument("--dpo_path", default=None, help="DPO jsonl (chosen/rejected)")
    real.add_argument("--dpo_val_path", default=None, help="DPO validation jsonl (default: ~1%% of --dpo_path)")
    real.add_argument("--val_every", type=int, default=200, help="every Nth pretraining document goes to val.bin")
    real.add_argument("--tokenizer_max_chars", type=int, default=DEFAULT_TOKENIZER_MAX_CHARS,
                      help="train the tokenizer on at most this many characters of pretraining text")
    emb = p.add_argument_group("embedded corpus size")
    emb.add_argument("--n_stories", type=int, default=40000)
    emb.add_argument("--n_sft", type=int, default=20000)
    emb.add_argument("--n_dpo", type=int, default=10000)
    emb.add_argument("--n_eval", type=int, default=500)
    p.add_argument("--num_threads", type=int, default=None, help="tokenizer threads (default min(8, cores))")
    args = p.parse_args(argv)
    try:
        if any(x is not None for x in (args.pretrain_path, args.sft_path, args.dpo_path)):
            if args.out_dir is None:
                p.error("--out_dir is required when preparing your own data files")
            prepare_files(args.out_dir, args.pretrain_path, args.sft_path, args.dpo_path, args.sft_val_path,
                          args.dpo_val_path, args.vocab_size, args.tokenizer, args.val_every,
                          args.tokenizer_max_chars, args.seed, args.num_threads)
        else:
            prepare_default(args.out_dir or "data/embedded", args.vocab_size, args.seed, tokenizer=args.tokenizer,
                            num_threads=args.num_threads, n_stories=args.n_stories, n_sft=args.n_sft,
                            n_dpo=args.n_dpo, n_eval=args.n_eval)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
