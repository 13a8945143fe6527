"""Which prepared directory to train on, prepared on first use: the embedded corpus, or raw text
keyed by its path, content hash and settings (data/prepared/<stem>-<8 hex>). A directory is
reused only when its meta.json records the same source and settings; the preparing itself is
data/prepare.py's. And where a SFT or DPO run's chat data is (resolve_chat_data).
"""
import hashlib
import inspect
import json
import os

import torch.distributed as dist

from data import prepare
from data.corpus import corpus_fingerprint
from data.readers import DataError, pretrain_files, source_identity

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


# Besides the source, what shapes a prepare_files result; a reused directory must match them too.
FILES_SETTINGS = ("vocab_size", "tokenizer", "tokenizer_max_chars", "val_fraction", "val_max_tokens", "seed")


def _files_settings(settings: dict) -> dict:
    """FILES_SETTINGS as given, else prepare_files's defaults."""
    unknown = sorted(set(settings) - set(FILES_SETTINGS))
    if unknown:
        raise TypeError(f"unexpected settings {unknown}; prepare_source takes {', '.join(FILES_SETTINGS)}")

    defaults = inspect.signature(prepare.prepare_files).parameters
    return {k: settings[k] if k in settings else defaults[k].default for k in FILES_SETTINGS}


def _recorded_source(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f).get("source") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _made_from(out_dir: str, wanted: dict) -> bool:
    recorded = _recorded_source(out_dir)
    return all(k in recorded and recorded[k] == v for k, v in wanted.items())


def _candidate_names(identity: dict, settings: dict) -> list[str]:
    """<stem>-<8 hex>, readable and distinct per (path, content, settings); longer hashes in the
    unlikely case a directory of that name holds something else."""
    stem = os.path.splitext(os.path.basename(identity["path"]))[0] or "data"
    key = hashlib.sha256(json.dumps({**identity, **settings}, sort_keys=True).encode("utf-8")).hexdigest()
    return [f"{stem}-{key[:n]}" for n in (8, 16, 64)]


def _other_preparations(prepared_root: str, path: str) -> list[str]:
    """Directories under prepared_root prepared from `path` (with other content or settings)."""
    if not os.path.isdir(prepared_root):
        return []
    found = []
    for name in sorted(os.listdir(prepared_root)):
        if name.startswith("."):  # a staging folder, complete or not, is no preparation
            continue
        pretrain = _recorded_source(os.path.join(prepared_root, name)).get("pretrain") or {}
        if isinstance(pretrain, dict) and pretrain.get("path") == path:
            found.append(os.path.join(prepared_root, name))
    return found


def prepare_source(data_path: str | None, prepared_root: str, embedded_dir: str = EMBEDDED_DIR,
                   quiet: bool = False, num_threads: int | None = None, **settings) -> str:
    """The prepared directory to pretrain on for a --data_path, prepared on first use:

    - None: the embedded corpus in embedded_dir (ensure_prepared);
    - a prepared directory (one with meta.json): itself;
    - a .txt/.jsonl/.parquet file or a folder of them: the directory under prepared_root whose
      meta.json records this source, same absolute path and same bytes (source_identity), made
      with the same settings (prepare_files's vocab_size, val_fraction, ...); otherwise a new
      one named <stem>-<8 hex>. A directory prepared from anything else is never overwritten.

    Run it on one process only; the others wait for it and use the returned path. A stop signal
    while hashing or preparing raises prepare.Interrupted, a DataError."""

    with prepare.interruptible():  # a stop signal ends in a DataError, after the clean-up
        if data_path is None:
            return ensure_prepared(embedded_dir)
        if os.path.isdir(data_path) and os.path.exists(os.path.join(data_path, "meta.json")):
            return data_path
        pretrain_files(data_path)  # missing, empty, unsupported type, not a data folder: stop before hashing
        settings, identity = _files_settings(settings), source_identity(data_path, quiet)
        wanted = {"kind": "files", "pretrain": identity, **settings}
        prepared_root = os.path.abspath(prepared_root)
        for name in _candidate_names(identity, settings):
            out = os.path.join(prepared_root, name)
            if _made_from(out, wanted):
                _say(quiet, f"using {out}, prepared from {identity['path']} (same content, sha256 "
                            f"{identity['sha256'][:12]}...)")
                return out
            if not os.path.exists(out):
                break
        else:
            raise DataError(f"{prepared_root}: the names for {identity['path']} are taken by other data; "
                            f"prepare it with data/prepare.py --out_dir")
        for other in _other_preparations(prepared_root, identity["path"]):
            _say(quiet, f"{other} was prepared from an earlier version of {identity['path']} (or other "
                        f"settings); kept, delete it once no checkpoint needs its tokenizer")
        _say(quiet, f"preparing {identity['path']} into {out} (first use of this content; for another vocabulary "
                    f"size or val split run data/prepare.py yourself)...")
        return prepare.prepare_files(out, pretrain_path=identity["path"], num_threads=num_threads, quiet=quiet,
                                     **settings)


def ensure_prepared(out_dir: str = "data/embedded", **kwargs) -> str:
    """Prepare the embedded default into out_dir unless its meta.json says it is there already,
    generated by the current data/corpus.py. One generated by other corpus code is regenerated
    with the arguments it was made with (kwargs override them); a directory prepared from files
    is left alone. In a multi-process run call it on rank 0 and barrier before the other ranks
    read the data. A stop signal while preparing raises prepare.Interrupted, a DataError."""

    with prepare.interruptible():  # a stop signal ends in a DataError, after the clean-up
        meta_path = os.path.join(out_dir, "meta.json")
        if not os.path.exists(meta_path):
            print(f"preparing the embedded default data in {out_dir} (first run only)...", flush=True)
            return prepare.prepare_default(out_dir, **kwargs)
        try:
            with open(meta_path, encoding="utf-8") as f:
                source = json.load(f).get("source", {})
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{meta_path}: unreadable ({e}); delete {out_dir} to have it prepared again") from None
        if source.get("kind") != "embedded" or source.get("corpus_fingerprint") == corpus_fingerprint():
            return out_dir
        print(f"{out_dir} was generated by another version of data/corpus.py; regenerating it...", flush=True)
        made_with = {k: v for k, v in source.items() if k not in ("kind", "corpus_fingerprint")}
        return prepare.prepare_default(out_dir, **{**made_with, **kwargs})


def resolve_chat_data(kind: str, data_path: str | None, rank: int, world_size: int):
    """Where the SFT or DPO data of a run is: (train_file, val_file or None, data_dir or None).

    Nothing: the embedded corpus (rank 0 prepares it on first use). A directory: its
    <kind>_train.jsonl and <kind>_val.jsonl (as data/prepare.py writes them). A .jsonl file:
    that file alone; the caller then splits a validation set off it (split_val) or reads --val_path.
    """
    if data_path is None:
        if rank == 0:
            ensure_prepared(EMBEDDED_DIR)
        if world_size > 1:
            dist.barrier()
        data_path = EMBEDDED_DIR
    if os.path.isdir(data_path):
        train, val = (os.path.join(data_path, f"{kind}_{split}.jsonl") for split in ("train", "val"))
        if not os.path.exists(train):
            raise DataError(f"--data_path {data_path}: directory has no {kind}_train.jsonl; give a .jsonl file or a "
                            f"directory prepared by data/prepare.py with --{kind}_path")
        return train, val if os.path.exists(val) else None, data_path
    if not os.path.exists(data_path):
        raise DataError(f"--data_path {data_path}: no such file or directory")
    return data_path, None, None
