"""Prepare training data in one directory: tokenizer.json, train.bin/val.bin token files,
SFT/DPO jsonl splits, and meta.json describing them.

    python data/prepare.py                                   # embedded corpus -> data/embedded
    python data/prepare.py --pretrain_path P [--sft_path S] [--dpo_path D] --out_dir O

Everything is built in a temporary directory and moved in only once all of it succeeded: a new
directory by one rename, an existing one file by file with meta.json last, so its presence means
"complete" (data/cache.py relies on that). A full disk, an unwritable folder or a stop signal
(Ctrl-C, SIGTERM, SIGHUP) removes the temporary directory and ends in one line; one that a killed
process left is removed by the next preparation of the same directory.
"""
import argparse
import contextlib
import errno
import inspect
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

if __name__ == "__main__" and not __package__:  # `python data/prepare.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data.corpus import corpus_fingerprint
from data.loaders import token_dtype
from data.readers import (DataError, pretrain_files, read_dpo_jsonl, read_pretrain_texts, read_sft_jsonl,
                          source_identity)
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

CHAT_FILES = tuple(f"{kind}_{split}.jsonl" for kind in ("sft", "dpo") for split in ("train", "val", "test"))
PREPARED_FILES = ("tokenizer.json", "train.bin", "val.bin", *CHAT_FILES)  # meta.json goes last
DEFAULT_TOKENIZER_MAX_CHARS = 200_000_000
ENCODE_CHUNK = 1024  # documents per tiktoken batch call
COPY_CHUNK = 1 << 24  # tokens per read when splitting the token stream into train and val
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, then the special tokens
SEED_MAX = 2**64 - 1  # a 64-bit seed, the most torch.manual_seed takes; more is surely a typo

# Validation split of real pretraining text. 10% (what nanoGPT holds out of Tiny Shakespeare)
# makes a small corpus's val loss measurable; a floor of 32,768 tokens (128 windows of the
# default 256-token context) keeps it so for corpora under ~330k tokens, but never takes more
# than a fifth of the text; beyond 1M tokens more val only costs training text, since the
# mean loss over 1M tokens is already far steadier than the gaps between runs worth measuring.
VAL_FRACTION = 0.10
VAL_MIN_TOKENS = 32_768
VAL_MAX_SHARE = 0.20
VAL_MAX_TOKENS = 1_000_000
# The val tokens are taken in up to 100 evenly spaced pieces of >= 4096 tokens, so every part of
# a corpus (each file of a folder, the end of a book as well as its start) is represented, and a
# corpus of few documents, or one long one, splits as well as one of many.
VAL_PIECE_TOKENS = 4096
VAL_MAX_PIECES = 100


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


class Interrupted(DataError):
    """SIGINT, SIGTERM or SIGHUP while preparing. A DataError, so each script stops with its one
    line; data/prepare.py exits with 128 + the signal's number, as a shell reports a killed process."""

    def __init__(self, signum: int, out_dir: str | None = None, complete: bool = False):
        name = signal.Signals(signum).name
        if out_dir is None:
            msg = f"{name}: stopped before anything was written"
        elif complete:
            msg = f"{name} while preparing {out_dir}: stopped once it was complete"
        else:
            msg = f"{name} while preparing {out_dir}: stopped; its staging folder is removed and {out_dir} is as it was"
        super().__init__(msg)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Handlers that stop the process, which preparing replaces with its own. One that a training loop
# installed (save at the next logged step) is left alone.
DEFAULT_HANDLERS = (signal.SIG_DFL, signal.default_int_handler, _raise_interrupted)


@contextlib.contextmanager
def _stop_signals_call(handler):
    """Inside, SIGINT, SIGTERM and SIGHUP call handler where they would otherwise stop the process
    (set only in the main thread: no other may set handlers)."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in DEFAULT_HANDLERS:
                saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def interruptible():
    """A context inside which a stop signal raises Interrupted, a DataError, so that a caller's
    clean-up runs and its one-line error handling reports it (no KeyboardInterrupt traceback,
    no SIGTERM death that skips the clean-up)."""
    return _stop_signals_call(_raise_interrupted)


def _staging_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_staging(out_dir: str, quiet: bool) -> None:
    """Remove staging folders for out_dir that a killed process (SIGKILL, a power cut) left: those
    named for this host and a process id that no longer runs. A live one is another preparation
    under way; one of another host may be too, so both are left alone."""
    parent, prefix = os.path.dirname(out_dir), _staging_prefix(out_dir)
    for name in os.listdir(parent):
        host_pid_rest = name[len(prefix):].rsplit("-", 2) if name.startswith(prefix) else []
        if len(host_pid_rest) == 3 and host_pid_rest[0] == socket.gethostname() \
                and host_pid_rest[1].isdigit() and not _alive(int(host_pid_rest[1])):
            stale = os.path.join(parent, name)
            shutil.rmtree(stale, ignore_errors=True)  # hidden, so never read as data if it stays
            if not os.path.exists(stale):
                _say(quiet, f"removed {stale}, left by a preparation that was killed (process {host_pid_rest[1]})")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_error(e: OSError, out_dir: str) -> DataError | None:
    """The one line for a failed write while preparing out_dir, None for another kind of OSError."""
    elsewhere = "or prepare elsewhere with data/prepare.py --out_dir DIR (and train with --data_path DIR)"
    if e.errno in NO_SPACE:
        return DataError(f"{os.path.dirname(out_dir)}: no space left ({e.strerror}) while preparing {out_dir}; "
                         f"nothing was written there (the staging folder is removed): free some space {elsewhere}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        where = os.path.dirname(e.filename) if isinstance(e.filename, str) else os.path.dirname(out_dir)
        return DataError(f"{where}: cannot write there ({e.strerror}) to prepare {out_dir}; make it "
                         f"writable {elsewhere}")
    return None


@contextlib.contextmanager
def _staged(out_dir: str, quiet: bool = True):
    """Yield an empty temp dir next to out_dir; on success move its files into out_dir. On failure
    or a stop signal nothing is left behind, not even a parent folder this call created; a full
    disk or an unwritable folder is one DataError naming it, a signal an Interrupted."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: exists and is not a directory; choose another --out_dir")
    made_parent = not os.path.isdir(parent)
    # While "hold" is set (the commit, the clean-up) a signal is only recorded, so neither is cut
    # half-way; before, it raises, and the clean-up below runs (a SIGTERM's default would skip it).
    state = {"hold": False, "pending": None}

    def on_signal(signum, frame):
        if state["hold"]:
            state["pending"] = state["pending"] or signum
            return
        state["hold"] = True
        raise Interrupted(signum, out_dir)

    tmp = None
    with _stop_signals_call(on_signal):
        try:
            os.makedirs(parent, exist_ok=True)
            _remove_stale_staging(out_dir, quiet)
            # host and process id in the name tell a later run whether its maker still runs
            tmp = tempfile.mkdtemp(prefix=f"{_staging_prefix(out_dir)}{socket.gethostname()}-{os.getpid()}-",
                                   dir=parent)
            yield tmp
            state["hold"] = True
            _commit(tmp, out_dir)
        except OSError as e:
            raise _write_error(e, out_dir) or e from None
        finally:
            state["hold"] = True
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if made_parent and not os.path.exists(out_dir):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
    if state["pending"]:
        raise Interrupted(state["pending"], out_dir, complete=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _commit(tmp: str, out_dir: str) -> None:
    if not os.path.exists(out_dir):
        # A new directory appears whole in one rename, so it is never seen half-written.
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it private; give it a normal folder's mode
        os.rename(tmp, out_dir)
        return
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


def _batches(items, n: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenize_into(tok: Tokenizer, texts, path: str, num_threads: int, quiet: bool) -> int:
    """Write each text's tokens, followed by eos, to the flat token file `path`. Returns the
    number of tokens written."""
    dtype = token_dtype(tok.vocab_size)
    n_tokens = n_docs = n_chars = 0
    t0 = last = time.time()
    with open(path, "wb") as f:
        for chunk in _batches(texts, ENCODE_CHUNK):
            ids = []
            for doc in tok.encode_batch(chunk, num_threads):
                ids += doc
                ids.append(tok.eos_id)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens, n_docs, n_chars = n_tokens + len(ids), n_docs + len(chunk), n_chars + sum(map(len, chunk))
            if time.time() - last > 5:
                last = time.time()
                _say(quiet, f"  {n_docs:,} docs, {n_chars / 1e6:,.1f}M chars, {n_tokens / 1e6:,.2f}M tokens, "
                            f"{n_docs / (last - t0):,.0f} docs/s")
    _say(quiet, f"  {n_docs:,} docs tokenized into {n_tokens:,} tokens, "
                f"{n_tokens / max(time.time() - t0, 1e-9):,.0f} tokens/s")
    return n_tokens


def val_token_count(n_tokens: int, fraction: float = VAL_FRACTION, max_tokens: int = VAL_MAX_TOKENS) -> int:
    """How many of n_tokens pretraining tokens go to val.bin (see VAL_FRACTION and the rest)."""
    n_val = min(max_tokens, max(int(fraction * n_tokens), min(VAL_MIN_TOKENS, int(VAL_MAX_SHARE * n_tokens))))
    if n_val < 1:
        raise DataError(f"the pretraining text is only {n_tokens} tokens: too little to split into train and val")
    return n_val


def val_spans(n_tokens: int, n_val: int) -> list[tuple[int, int]]:
    """[start, end) token ranges, n_val tokens in all, that form val.bin: the last n_val/pieces
    tokens of each of `pieces` equal stretches of the stream. Pieces cut through documents
    where they fall; a window across a cut reads like one across a document boundary."""
    pieces = max(1, min(VAL_MAX_PIECES, n_val // VAL_PIECE_TOKENS))
    spans = []
    for i in range(pieces):
        end = (i + 1) * n_tokens // pieces
        spans.append((end - n_val // pieces - (i < n_val % pieces), end))
    return spans


def _split_off_val(stream: str, out: str, n_val: int, tok: Tokenizer) -> dict:
    """Copy the token file `stream` into out/train.bin and out/val.bin (val_spans to val, the rest
    to train, in order). Returns token counts and, per split, the documents ending in it."""
    tokens = np.memmap(stream, dtype=token_dtype(tok.vocab_size), mode="r")
    counts = {"train_tokens": 0, "val_tokens": 0, "train_docs": 0, "val_docs": 0}
    with open(os.path.join(out, "train.bin"), "wb") as ftrain, open(os.path.join(out, "val.bin"), "wb") as fval:
        def copy(start, end, f, split):
            for i in range(start, end, COPY_CHUNK):
                piece = tokens[i:min(end, i + COPY_CHUNK)]
                f.write(piece.tobytes())
                counts[f"{split}_tokens"] += len(piece)
                counts[f"{split}_docs"] += int(np.count_nonzero(piece == tok.eos_id))

        pos = 0
        for start, end in val_spans(len(tokens), n_val):
            copy(pos, start, ftrain, "train")
            copy(start, end, fval, "val")
            pos = end
        copy(pos, len(tokens), ftrain, "train")
    del tokens
    os.remove(stream)
    return counts


def _say_split(counts: dict, quiet: bool) -> None:
    total = counts["train_tokens"] + counts["val_tokens"]
    _say(quiet, f"  train {counts['train_tokens']:,} tokens, val {counts['val_tokens']:,} tokens "
                f"({100 * counts['val_tokens'] / total:.1f}%)")


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
    with _staged(out_dir, quiet) as tmp:
        tok = _get_tokenizer(tokenizer, pre["train"], vocab_size, DEFAULT_TOKENIZER_MAX_CHARS, quiet)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        counts = {}
        for split in ("train", "val"):  # the corpus has its own held-out stories
            path = os.path.join(tmp, f"{split}.bin")
            counts[f"{split}_tokens"] = _tokenize_into(tok, pre[split], path, num_threads or _threads(), quiet)
            counts[f"{split}_docs"] = len(pre[split])
        _say_split(counts, quiet)
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
                  val_fraction: float = VAL_FRACTION, val_max_tokens: int = VAL_MAX_TOKENS,
                  tokenizer_max_chars: int = DEFAULT_TOKENIZER_MAX_CHARS, seed: int = 1337,
                  num_threads: int | None = None, quiet: bool = False) -> str:
    """Prepare real data files into out_dir. val_token_count(total) pretraining tokens (10% of a
    small corpus, at most 1M) go to val.bin in pieces spread over the text (val_spans). SFT/DPO
    files are validated and rewritten normalised ({"conversations": ...} / {"chosen",
    "rejected"} message lists). meta.json records each input's source_identity."""
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
    if pretrain_path is not None:
        pretrain_files(pretrain_path)  # a missing, empty or unsupported path stops here, before hashing
        if os.path.realpath(pretrain_path) == os.path.realpath(out_dir):
            raise DataError(f"{out_dir}: is the folder of raw text itself; the prepared files go to a folder of "
                            f"their own: choose another --out_dir")
    inputs = {"pretrain": pretrain_path, "sft": sft_path, "sft_val": sft_val_path, "dpo": dpo_path,
              "dpo_val": dpo_val_path}
    # Hashed before reading: an input edited meanwhile is recorded as its old self, so it is
    # prepared again on next use, never reused as if it matched.
    identities = {k: source_identity(v, quiet) if v is not None else None for k, v in inputs.items()}
    with _staged(out_dir, quiet) as tmp:
        texts = read_pretrain_texts(pretrain_path) if pretrain_path is not None else []
        tok = _get_tokenizer(tokenizer, texts, vocab_size, tokenizer_max_chars, quiet)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        counts = {}
        if pretrain_path is not None:
            _say(quiet, f"tokenizing {pretrain_path}...")
            stream = os.path.join(tmp, "tokens.bin")
            n_tokens = _tokenize_into(tok, read_pretrain_texts(pretrain_path), stream, num_threads or _threads(), quiet)
            counts = _split_off_val(stream, tmp, val_token_count(n_tokens, val_fraction, val_max_tokens), tok)
            _say_split(counts, quiet)
        chat_counts = {}
        for kind, splits in chat.items():
            for split, records in splits.items():
                _write_jsonl(os.path.join(tmp, f"{kind}_{split}.jsonl"), records)
            chat_counts[kind] = {split: len(records) for split, records in splits.items()}
        source = {"kind": "files", **identities, "vocab_size": vocab_size, "tokenizer": tokenizer,
                  "tokenizer_max_chars": tokenizer_max_chars, "val_fraction": val_fraction,
                  "val_max_tokens": val_max_tokens, "seed": seed}
        _write_json(os.path.join(tmp, "meta.json"), _meta(tok, counts, chat_counts, source))
    _say(quiet, f"prepared {out_dir} in {time.time() - t0:.1f}s")
    return out_dir


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def bounded(kind, lo, hi=None, above: bool = False, below: bool = False):
    """An argparse type: a finite `kind` (int or float) >= lo (> lo if above) and <= hi (< hi if below),
    refused at parse time with the allowed range (argparse puts the flag's name in front)."""
    rule = f"{'an integer' if kind is int else 'a number'} {'>' if above else '>='} {lo}"
    rule += f" and {'<' if below else '<='} {hi}" if hi is not None else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        in_range = (value > lo if above else value >= lo) and (hi is None or (value < hi if below else value <= hi))
        if not (math.isfinite(value) and in_range):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="output directory (default data/embedded; required with data paths)")
    p.add_argument("--vocab_size", type=bounded(int, MIN_VOCAB_SIZE, 2**32), default=4096,
                   help=f"tokenizer size to train, special tokens included (at least {MIN_VOCAB_SIZE})")
    p.add_argument("--tokenizer", default=None,
                   help="use this tokenizer.json or tiktoken name (gpt2) instead of training one")
    p.add_argument("--seed", type=bounded(int, 0, SEED_MAX), default=1337)
    real = p.add_argument_group("real data (leave out for the embedded default corpus)")
    real.add_argument("--pretrain_path", default=None, help=".txt/.jsonl/.parquet file or a directory of them")
    real.add_argument("--sft_path", default=None, help="SFT jsonl (conversations/messages)")
    real.add_argument("--sft_val_path", default=None, help="SFT validation jsonl (default: ~1%% of --sft_path)")
    real.add_argument("--dpo_path", default=None, help="DPO jsonl (chosen/rejected)")
    real.add_argument("--dpo_val_path", default=None, help="DPO validation jsonl (default: ~1%% of --dpo_path)")
    real.add_argument("--val_fraction", type=bounded(float, 0, 0.5, above=True), default=VAL_FRACTION,
                      help=f"share of the pretraining tokens held out in val.bin (at least {VAL_MIN_TOKENS:,} "
                           f"tokens when the text allows)")
    real.add_argument("--val_max_tokens", type=bounded(int, 1), default=VAL_MAX_TOKENS,
                      help="at most this many pretraining tokens go to val.bin")
    real.add_argument("--tokenizer_max_chars", type=bounded(int, 1), default=DEFAULT_TOKENIZER_MAX_CHARS,
                      help="train the tokenizer on at most this many characters of pretraining text")
    emb = p.add_argument_group("embedded corpus size")
    emb.add_argument("--n_stories", type=bounded(int, 1), default=40000)
    emb.add_argument("--n_sft", type=bounded(int, 1), default=20000)
    emb.add_argument("--n_dpo", type=bounded(int, 1), default=10000)
    emb.add_argument("--n_eval", type=bounded(int, 1), default=500)
    p.add_argument("--num_threads", type=bounded(int, 1), default=None,
                   help="tokenizer threads (default min(8, cores))")
    args = p.parse_args(argv)
    files = any(x is not None for x in (args.pretrain_path, args.sft_path, args.dpo_path))
    if files and args.out_dir is None:
        p.error("--out_dir is required when preparing your own data files")
    with interruptible():
        try:
            if files:
                prepare_files(args.out_dir, args.pretrain_path, args.sft_path, args.dpo_path, args.sft_val_path,
                              args.dpo_val_path, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                              val_fraction=args.val_fraction, val_max_tokens=args.val_max_tokens,
                              tokenizer_max_chars=args.tokenizer_max_chars, seed=args.seed,
                              num_threads=args.num_threads)
            else:
                prepare_default(args.out_dir or "data/embedded", args.vocab_size, args.seed, tokenizer=args.tokenizer,
                                num_threads=args.num_threads, n_stories=args.n_stories, n_sft=args.n_sft,
                                n_dpo=args.n_dpo, n_eval=args.n_eval)
        except Interrupted as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(128 + e.signum)  # as a shell reports a process a signal stopped
        except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
