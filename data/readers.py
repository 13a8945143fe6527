"""Readers for real datasets: pretraining text, SFT conversations, DPO preference pairs.

Accepted formats are MiniMind's and the Hugging Face conventions (see each function).
Every problem a user can fix raises DataError naming the file, the 1-based line where there
is one, and what to change; the scripts print just that message and exit 1.
"""
import hashlib
import importlib.util
import json
import os
from typing import Iterator

ROLES = ("system", "user", "assistant")
PRETRAIN_SUFFIXES = (".txt", ".jsonl", ".parquet")
GZIP_MAGIC = b"\x1f\x8b"
# data/prepare.py output, never pretraining text: a folder holding them is a prepared one
PREPARED_MARKERS = ("train.bin", "val.bin", "sft_train.jsonl", "dpo_train.jsonl")


class DataError(Exception):
    """Bad input data; the message alone tells the user what to fix."""


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .jsonl file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line ending), decoded strictly as UTF-8."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check that it is a file you may read") from None
    with f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(GZIP_MAGIC):
                    raise DataError(f"{path}: is gzip-compressed; decompress it first (gunzip)")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); "
                                    f"re-encode the file as UTF-8") from None
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                yield lineno, line.rstrip("\r\n")
        except OSError as e:  # the disk or network filesystem failed mid-file
            raise DataError(f"{path}:{lineno + 1}: reading failed ({e.strerror}); check the file and "
                            f"its disk, then run again") from None


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in a parsed JSON record a string holds a lone UTF-16 surrogate ("\\ud800" escaped in
    the file), e.g. "conversations[1].content": not a character, so it can be neither tokenized
    nor written back as UTF-8. None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where if where.startswith("a key") else f"'{where}'" if where else "a string"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = (_lone_surrogate(key, f"a key of '{where}'" if where else "a key of the record")
                     or _lone_surrogate(item, f"{where}.{key}" if where else key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """Each non-blank line parsed as one JSON object."""
    _check_file(path)
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one complete JSON object") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of over 4300 digits, nesting past the stack
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
            raise DataError(f"{where}: JSON that Python cannot read ({reason}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        # a lone surrogate can only come from a \\u escape: strictly decoded UTF-8 holds none
        if ("\\ud" in line or "\\uD" in line) and (place := _lone_surrogate(obj)):
            raise DataError(f"{where}: a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape) in {place}: "
                            f"no character, so it cannot be tokenized; fix or remove that escape")
        yield lineno, obj


def _messages(msgs, where: str, key: str) -> list[dict]:
    """Validate a list of {"role", "content"} messages; return them reduced to those two keys."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with \"role\" and \"content\" keys")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}] content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _no_records(path: str, what: str) -> DataError:
    return DataError(f"{path}: no usable records (only blank lines?); expected {what}")


# ---------------------------------------------------------------------------------------------
# pretraining text


def _read_txt(path: str) -> Iterator[str]:
    """Documents are separated by one or more blank lines; newlines inside a document are kept
    (so a file with one document per line and no blank lines is read as ONE document)."""
    doc = []
    for _, line in _lines(path):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _chat_kind(obj: dict) -> str | None:
    """The chat format ("SFT" or "DPO") whose keys a json record has, else None."""
    if "chosen" in obj and "rejected" in obj:
        return "DPO"
    if "conversations" in obj or "messages" in obj:
        return "SFT"
    return None


def _read_text_jsonl(path: str) -> Iterator[str]:
    for lineno, obj in _json_lines(path):
        if "text" not in obj:
            kind = _chat_kind(obj)
            # SFT/DPO files in a folder given as pretraining text are the likely cause; say so
            hint = (f"this is {kind} data, not pretraining text" if kind
                    else f"keys found: {', '.join(obj) or 'none'}")
            raise DataError(f"{path}:{lineno}: missing key 'text' ({hint}); "
                            f"pretraining jsonl lines look like {{\"text\": \"...\"}}")
        if not isinstance(obj["text"], str):
            raise DataError(f"{path}:{lineno}: 'text' must be a string, got {type(obj['text']).__name__}")
        if obj["text"].strip():
            yield obj["text"]


def _read_parquet(path: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    unreadable = (OSError, ValueError, pa.ArrowException)  # a damaged file, or not parquet at all
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except unreadable as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    if "text" not in names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(names)})")
    row = 0
    try:
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for t in batch.column(0).to_pylist():
                row += 1
                if t is not None and not isinstance(t, str):
                    raise DataError(f"{path}: row {row}: the 'text' column must hold strings, found "
                                    f"{type(t).__name__}")
                if t and t.strip():
                    yield t
    except unreadable as e:
        raise DataError(f"{path}: cannot read past row {row} ({e}); the file is damaged: write it again") from None


def _is_pretrain_file(name: str) -> bool:
    return name.lower().endswith(PRETRAIN_SUFFIXES)


def _how_to_read(names: list[str]) -> list[str]:
    """What to do with files of kinds that are not read as pretraining text."""
    hints = []
    if any(n.lower().endswith(".gz") for n in names):
        hints.append("decompress .gz files (gunzip)")
    if any(n.lower().endswith(".json") for n in names):
        hints.append("a .json file of one JSON object per line is a .jsonl file: rename it")
    return hints


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _raw_files_under(path: str) -> list[str]:
    """Every pretraining file under a folder, sorted. The folder is read whole or not at all: a file
    of another kind, or a prepared data directory (whose sft/dpo jsonl files would otherwise be read
    as text and fail far from the cause), stops it by name. Symbolic links to folders are followed,
    each folder and file read once however many links lead to it (so a link cycle ends). Hidden
    entries (.git, .cache, a preparation's staging folder) are not data and are passed over."""
    if os.path.exists(os.path.join(path, "meta.json")):
        raise DataError(f"{path}: is a prepared data directory (it has meta.json), not raw text; pass it "
                        f"to the training scripts as --data_path, or give data/prepare.py the raw files")
    found = [n for n in PREPARED_MARKERS if os.path.exists(os.path.join(path, n))]
    if found:
        raise DataError(f"{path}: looks like a prepared data directory ({', '.join(found)}) but has no "
                        f"meta.json, which data/prepare.py writes last: the preparation did not finish or "
                        f"the file was removed; prepare it again with data/prepare.py --out_dir {path} "
                        f"from the raw files it came from")
    def unlistable(e: OSError):  # os.walk would skip such a folder without a word
        raise DataError(f"{e.filename}: cannot list this folder ({e.strerror}); check its permissions")

    files, others, seen_dirs, seen_files = [], [], set(), set()
    for root, dirs, names in os.walk(path, onerror=unlistable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        if root != path and os.path.exists(os.path.join(root, "meta.json")):
            raise DataError(f"{root}: a prepared data directory inside the folder of raw text {path}; "
                            f"move it out of that folder")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git, .cache, staging dirs
        for name in sorted(n for n in names if not n.startswith(".")):
            f = os.path.join(root, name)
            if os.path.realpath(f) not in seen_files:
                seen_files.add(os.path.realpath(f))
                (files if _is_pretrain_file(name) else others).append(f)
    kinds = ", ".join(PRETRAIN_SUFFIXES)
    if not files:
        listing = f" (it holds {_some([os.path.relpath(f, path) for f in others])})" if others else ""
        raise DataError(f"{path}: neither a prepared data directory (no meta.json) nor a folder of "
                        f"{kinds} pretraining files{listing}; only those kinds are read as text")
    if others:
        names = [os.path.relpath(f, path) for f in others]
        raise DataError(f"{path}: {len(others)} file(s) are not pretraining text, which is read from "
                        f"{kinds} files only: {_some(names)}; "
                        + "; ".join(_how_to_read(names) + ["move anything else out of the folder"]))
    return sorted(files)


def pretrain_files(path: str) -> list[str]:
    """The files read_pretrain_texts(path) reads, in order, each checked to exist, be a readable,
    non-empty file and have a supported type."""
    if not os.path.lexists(path):
        raise DataError(f"{path}: no such file or directory")
    files = _raw_files_under(path) if os.path.isdir(path) else [path]
    for f in files:
        if not os.path.exists(f):
            raise DataError(f"{f}: a symbolic link to {os.readlink(f)}, which does not exist; fix or remove the link")
        if not os.path.isfile(f):
            raise DataError(f"{f}: not a regular file; pretraining text must be files")
        if not _is_pretrain_file(f):
            raise DataError(f"{f}: unsupported file type; pretraining text must be a "
                            f"{', '.join(PRETRAIN_SUFFIXES)} file or a folder of them"
                            + "".join(f"; {hint}" for hint in _how_to_read([f])))
        if not os.access(f, os.R_OK):
            raise DataError(f"{f}: not readable (permission denied); check the file's permissions")
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: file is empty")
        if f.lower().endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
            raise DataError(f"{f}: reading .parquet needs pyarrow, which is not installed (pip install pyarrow)")
    return files


def read_pretrain_texts(path: str) -> Iterator[str]:
    """Documents from a .txt (blank-line separated), .jsonl ({"text": ...}) or .parquet ("text"
    column) file, or from every such file under a directory in sorted order. Streams; the path
    checks happen at call time, content errors as the iterator reaches them."""
    files = pretrain_files(os.fspath(path))

    def docs():
        for f in files:
            suffix = os.path.splitext(f)[1].lower()
            reader = {".txt": _read_txt, ".jsonl": _read_text_jsonl, ".parquet": _read_parquet}[suffix]
            n = 0
            for doc in reader(f):
                n += 1
                yield doc
            if n == 0:
                raise _no_records(f, "text documents")

    return docs()


# ---------------------------------------------------------------------------------------------
# SFT and DPO


def read_sft_jsonl(path: str) -> list[dict]:
    """Lines of {"conversations": [{"role", "content"}, ...]} (MiniMind) or {"messages": [...]}
    (Hugging Face). Returns {"conversations": msgs, **other keys}; every conversation needs at
    least one assistant turn, since only assistant tokens are trained on."""
    path = os.fspath(path)
    out = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
        if key is None:
            raise DataError(f"{where}: missing key 'conversations' (or 'messages') holding a list of "
                            f"{{\"role\", \"content\"}} messages; keys found: {', '.join(obj) or 'none'}")
        msgs = _messages(obj[key], where, key)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: conversation has no assistant turn, so nothing to train on")
        rest = {k: v for k, v in obj.items() if k not in ("conversations", "messages")}
        out.append({"conversations": msgs, **rest})
    if not out:
        raise _no_records(path, "SFT conversations")
    return out


def _dpo_side(obj: dict, side: str, prompt: list[dict] | None, where: str) -> list[dict]:
    value = obj[side]
    if isinstance(value, str):
        if prompt is None:
            raise DataError(f"{where}: {side!r} is a string, which needs a 'prompt' key too")
        return prompt + [{"role": "assistant", "content": value}]
    msgs = _messages(value, where, side)
    return (prompt or []) + msgs


def read_dpo_jsonl(path: str) -> list[dict]:
    """Lines of {"chosen": [msgs], "rejected": [msgs]} (MiniMind), or {"prompt": str, "chosen":
    str, "rejected": str}, or {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]} with the
    prompt split off (Hugging Face). Returns {"chosen": msgs, "rejected": msgs, **other keys};
    both must share the prompt (all but the last message) and end with an assistant turn."""
    path = os.fspath(path)
    out = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("chosen", "rejected") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}; DPO lines need "
                            f"'chosen' and 'rejected' (and 'prompt' when those are strings)")
        prompt = None
        if "prompt" in obj:
            p = obj["prompt"]
            if isinstance(p, str):
                prompt = [{"role": "user", "content": p}]
            else:
                prompt = _messages(p, where, "prompt")
        chosen = _dpo_side(obj, "chosen", prompt, where)
        rejected = _dpo_side(obj, "rejected", prompt, where)
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: {side!r} must end with an assistant turn (the response being compared)")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: 'chosen' and 'rejected' must share the same prompt "
                            f"(every message but the last); they differ")
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({"chosen": chosen, "rejected": rejected, **rest})
    if not out:
        raise _no_records(path, "DPO preference pairs")
    return out


HASH_CHUNK = 1 << 23  # bytes per read when hashing a source file


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(HASH_CHUNK):
                h.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check that it is a file you may read") from None
    return h.hexdigest()


def source_identity(path: str, quiet: bool = True) -> dict:
    """{"path", "sha256", "bytes"} of a data file, or of a folder of pretraining files (its hash
    then covers each file's name and bytes). The bytes are hashed in full: size and mtime alike
    survive an edit within one mtime tick, a copy that keeps timestamps, or a restore from a
    backup, and training on stale tokens is a silently wrong result, while a streamed sha256
    costs a small fraction of tokenizing the same bytes."""
    path = os.path.realpath(path)
    files = pretrain_files(path) if os.path.isdir(path) else [path]
    size = sum(os.path.getsize(f) for f in files)
    if size > 1e9:
        print(f"hashing {path} ({size / 1e9:,.1f} GB) to tell whether it was prepared before...", flush=True) if not quiet else None
    if os.path.isdir(path):
        listing = "".join(f"{os.path.relpath(f, path)}\0{_file_sha256(f)}\n" for f in files)
        digest = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    else:
        digest = _file_sha256(path)
    return {"path": path, "sha256": digest, "bytes": size}
