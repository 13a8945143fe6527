"""Batch loaders: random windows of a flat token file (pretraining), padded chat batches (SFT),
and chosen/rejected batch pairs (DPO).

Every loader is deterministic given (seed, rank, its position) and exposes that position through
state_dict()/load_state_dict() as plain ints, so a checkpoint resumes the exact same data stream.
"""
import json
import os

import numpy as np
import torch

from data.chat import render_conversation
from data.readers import DataError


SCAN_CHUNK = 1 << 24  # tokens per read when looking for the largest id in a token file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def write_tokens(path: str, ids_iter, vocab_size: int) -> int:
    """Write an iterable of token-id chunks (lists or arrays, e.g. one per document) to a flat
    binary file, atomically (temp file + rename). Returns the number of tokens written."""
    dtype = token_dtype(vocab_size)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in ids_iter:
                arr = np.asarray(chunk, dtype=np.int64)
                bad = arr[(arr < 0) | (arr >= vocab_size)]
                if bad.size:
                    raise ValueError(f"token id {bad[0]} out of range for vocab_size {vocab_size}")
                f.write(arr.astype(dtype).tobytes())
                n += arr.size
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def _meta(path: str) -> dict:
    """meta.json next to a token file (prepare.py writes it), or {} when there is none."""
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
    if not os.path.exists(meta):
        return {}
    try:
        with open(meta, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta}: not valid JSON ({e}); prepare the data again") from None


def open_tokens(path: str, dtype=None, tokenizer=None) -> np.memmap:
    """A token file as a read-only memmap, after checking it is whole: its size a multiple of the
    token size and, when meta.json records it, the count prepare.py wrote. A file cut short by a
    full disk or an interrupted copy would otherwise train on a silently different set of tokens
    (or fail inside numpy with no hint of the cause). dtype defaults to meta.json's, else uint16.
    With `tokenizer`, also that the file was written by it (check_tokenizer)."""
    meta = _meta(path)
    if not os.path.exists(path):
        if meta:  # prepared with --sft_path/--dpo_path alone
            raise DataError(f"{path}: no such token file; its directory was prepared without pretraining "
                            f"text (data/prepare.py --pretrain_path)")
        raise DataError(f"{path}: no such token file (run `python data/prepare.py` first)")
    dtype = np.dtype(dtype if dtype is not None else meta.get("dtype", "uint16"))
    size = os.path.getsize(path)
    redo = "prepare the data again (data/prepare.py, or --data_path with the raw text)"
    if size == 0:
        raise DataError(f"{path}: token file is empty; {redo}")
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of {dtype.name} tokens "
                        f"({dtype.itemsize} bytes each): the file is truncated or damaged; {redo}")
    n, expected = size // dtype.itemsize, meta.get(f"{os.path.splitext(os.path.basename(path))[0]}_tokens")
    if expected is not None and n != expected:
        raise DataError(f"{path}: holds {n:,} tokens but meta.json records {expected:,}: the file is "
                        f"truncated or damaged; {redo}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokenizer is not None:
        check_tokenizer(path, tokens, meta, tokenizer)
    return tokens


def check_tokenizer(path: str, tokens: np.ndarray, meta: dict, tok) -> None:
    """The token file `path` was written by `tok`: meta.json's tokenizer fingerprint is tok's, or,
    where none is recorded, no id is past tok's vocabulary. A tokenizer.json swapped in after
    preparing would otherwise train on misread tokens without a word (a larger vocabulary) or
    fail deep inside the embedding with an IndexError (a smaller one)."""
    folder = os.path.dirname(os.path.abspath(path))
    redo = (f"prepare {folder} again (data/prepare.py, or --data_path with the raw text), or put back the "
            f"tokenizer.json it was prepared with")
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None:
        if recorded != tok.fingerprint:
            raise DataError(f"{folder}: its token files were written by another tokenizer (meta.json: vocab "
                            f"{meta.get('vocab_size')}, fingerprint {recorded}) than {tok.name} (vocab "
                            f"{tok.vocab_size}, fingerprint {tok.fingerprint}); {redo}")
        return
    if meta.get("vocab_size") not in (None, tok.vocab_size):
        raise DataError(f"{folder}: its token files were written by a tokenizer of {meta['vocab_size']} tokens "
                        f"(meta.json), not by {tok.name} of {tok.vocab_size}; {redo}")
    top = max(int(tokens[i:i + SCAN_CHUNK].max()) for i in range(0, len(tokens), SCAN_CHUNK))
    if top >= tok.vocab_size:
        raise DataError(f"{path}: holds token id {top}, past the {tok.vocab_size} tokens of {tok.name}: it was "
                        f"written by another tokenizer; {redo}")


class TokenWindowLoader:
    """Random windows of seq_len+1 tokens from a flat token file read with np.memmap.

    Batch `step` is one global batch of batch_size * world_size windows whose offsets come
    from np.random.default_rng([seed, step]); rank r takes rows [r*batch_size, (r+1)*batch_size).
    So ranks see different data, one process with batch 2B sees exactly what two processes
    with batch B see together, any batch can be recomputed from the step alone, and the
    loader's whole state is that step counter (a run can resume on another world size).
    Given the run's tokenizer, the file must have been written by it (check_tokenizer).
    """

    def __init__(self, path, batch_size, seq_len, rank=0, world_size=1, seed=0, dtype=None, tokenizer=None):
        path = os.fspath(path)
        self.path, self.batch_size, self.seq_len = path, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.tokens = open_tokens(path, dtype, tokenizer)
        self.dtype = self.tokens.dtype
        self.num_tokens = len(self.tokens)
        if self.num_tokens < seq_len + 1:
            raise DataError(f"{path}: has {self.num_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                            f"use a shorter --max_seq_len or more data")
        self.step = 0

    def next_batch(self):
        rng = np.random.default_rng([self.seed, self.step])
        offsets = rng.integers(0, self.num_tokens - self.seq_len, size=self.batch_size * self.world_size)
        offsets = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.step += 1
        windows = self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.seed = int(d["step"]), int(d["seed"])


def eval_batches(path, batch_size, seq_len, max_batches=None, rank=0, world_size=1, dtype=None):
    """Consecutive non-overlapping windows from the start of a token file, batches dealt to ranks
    round-robin (max_batches counts all ranks together, every rank gets the same number): the
    same fixed evaluation set every time. Yields (x, y) like TokenWindowLoader."""
    tokens = TokenWindowLoader(path, batch_size, seq_len, dtype=dtype).tokens
    n_windows = (len(tokens) - 1) // seq_len
    n_batches = n_windows // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    n_batches -= n_batches % world_size  # every rank runs the same number of eval steps
    if n_batches < 1:
        raise DataError(f"{path}: too few tokens ({len(tokens)}) for one eval batch of "
                        f"{batch_size} x {seq_len + 1} per rank; lower --batch_size or --max_seq_len")
    for b in range(rank, n_batches, world_size):
        starts = (b * batch_size + np.arange(batch_size)) * seq_len
        w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def eval_bytes_per_token(path, token_bytes, batch_size, seq_len, max_batches=None, world_size=1, dtype=None) -> float:
    """Mean UTF-8 bytes per target token over every window eval_batches yields to the ranks together:
    val loss (nats per token) / ln 2 / this = bits per byte. token_bytes: Tokenizer.token_bytes()."""
    total = count = 0
    for rank in range(world_size):
        for _, y in eval_batches(path, batch_size, seq_len, max_batches, rank, world_size, dtype):
            total += int(token_bytes[y.numpy()].sum())
            count += y.numel()
    return total / count


# ---------------------------------------------------------------------------------------------
# SFT and DPO: tokenize once, then pad batches


def _fit(ids: list[int], mask: list[int], max_seq_len: int):
    """Cut to max_seq_len+1 tokens (max_seq_len inputs and targets). None when no trained
    (mask=1) token is left among the targets, i.e. positions 1.. of the cut sequence.
    Kept as small numpy arrays: a Python int list per token costs ~10x the memory."""
    ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
    if not any(mask[1:]):
        return None
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def encode_sft(tok, examples: list[dict], max_seq_len: int):
    """Render each {"conversations": msgs} example. Longer than max_seq_len+1 tokens: truncated
    at the end (the tail of the conversation is lost); dropped when that would cut every assistant
    token. Returns ([(ids, mask)], n_truncated) with ids int32 and mask uint8 numpy arrays;
    n_truncated counts every over-long example, len(examples) - len(result) of them dropped."""
    out, n_truncated = [], 0
    for ex in examples:
        ids, mask = render_conversation(tok, ex["conversations"])
        if len(ids) > max_seq_len + 1:
            n_truncated += 1
        fitted = _fit(ids, mask, max_seq_len)
        if fitted is not None:
            out.append(fitted)
    if not out:
        raise DataError(f"no SFT example keeps an assistant token within max_seq_len={max_seq_len}, the model's "
                        f"context; shorten the conversations, or start from a model pretrained with a longer one")
    return out, n_truncated


def encode_dpo(tok, pairs: list[dict], max_seq_len: int, source: str = "the DPO data"):
    """Like encode_sft for {"chosen", "rejected"} pairs. A pair is dropped when either side loses
    all of its response tokens to the cut, or when chosen and rejected are the same tokens within
    it (the same replies, or replies that differ only after max_seq_len): such a pair's loss
    stays at ln 2 with zero gradient, a step spent on nothing. Returns ([dict(chosen_ids,
    chosen_mask, rejected_ids, rejected_mask)], counts) with counts of the pairs "truncated"
    (either side longer than max_seq_len+1 tokens, kept or not) and of those dropped:
    "no_reply", "identical" (as given) and "identical_cut" (differing only after the cut)."""
    out = []
    counts = {"truncated": 0, "no_reply": 0, "identical": 0, "identical_cut": 0}
    for pair in pairs:
        rendered = [render_conversation(tok, pair[side]) for side in ("chosen", "rejected")]
        counts["truncated"] += any(len(ids) > max_seq_len + 1 for ids, _ in rendered)
        fitted = [_fit(ids, mask, max_seq_len) for ids, mask in rendered]
        if None in fitted:
            counts["no_reply"] += 1
        elif rendered[0] == rendered[1]:
            counts["identical"] += 1
        elif all(np.array_equal(a, b) for a, b in zip(*fitted)):
            counts["identical_cut"] += 1
        else:
            (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = fitted
            out.append({"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                        "rejected_ids": rejected_ids, "rejected_mask": rejected_mask})
    if not out:
        why = [f"{counts['no_reply']:,} lose a whole reply to the cut" if counts["no_reply"] else "",
               f"{counts['identical_cut']:,} differ only after it" if counts["identical_cut"] else "",
               f"{counts['identical']:,} have the same chosen and rejected reply" if counts["identical"] else ""]
        fix = ("shorten the pairs, or start from a model pretrained with a longer context"
               if counts["no_reply"] or counts["identical_cut"]
               else "fix the data")
        raise DataError(f"{source}: no DPO pair is left to train on within max_seq_len={max_seq_len} "
                        f"({', '.join(w for w in why if w) or 'no pairs'}); {fix}")
    return out, counts


def collate_sft(rows, pad_id: int):
    """[(ids, mask)] -> (x, y, loss_mask), each (B, T) with T = longest-1, right-padded; x and y
    int64, loss_mask float32. y and loss_mask belong to the targets (loss_mask[i, t] = mask of
    ids[t+1]); at padding x = pad_id, y = -1, loss_mask = 0. Right padding needs no attention
    mask: with causal attention real positions never look at the padding after them."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    m = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        ids, mask = torch.as_tensor(np.asarray(ids, dtype=np.int64)), torch.as_tensor(np.asarray(mask))
        x[i, :n] = ids[:-1]
        y[i, :n] = ids[1:]
        m[i, :n] = mask[1:].float()
    return x, y, m


def collate_dpo(items, pad_id: int):
    """DPO items -> (x, y, loss_mask) of shape (2B, T): rows [0:B] chosen, rows [B:2B] rejected,
    so one forward pass scores both."""
    rows = [(it["chosen_ids"], it["chosen_mask"]) for it in items]
    rows += [(it["rejected_ids"], it["rejected_mask"]) for it in items]
    return collate_sft(rows, pad_id)


class SFTLoader:
    """Epoch-wise shuffled batches of encoded SFT examples.

    Epoch e's order is np.random.default_rng([seed, e]).permutation; rank r takes every
    world_size-th example of it, all ranks the same count (the remainder is skipped that epoch),
    and batches of batch_size (a last partial batch is skipped too). State: (epoch, position).
    """

    collate = staticmethod(collate_sft)

    def __init__(self, encoded, batch_size, rank=0, world_size=1, seed=0, pad_id=0):
        self.items = encoded
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.per_rank = len(encoded) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(encoded)} examples are fewer than batch_size x world_size = "
                            f"{batch_size} x {world_size}; lower --batch_size or add data")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = None, None

    def _share(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))
            self._order = perm[self.rank :: self.world_size][: self.per_rank]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self):
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._share()[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        return self.collate([self.items[i] for i in idx], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos, self.seed = int(d["epoch"]), int(d["pos"]), int(d["seed"])
        self._order_epoch = None


class DPOLoader(SFTLoader):
    """SFTLoader over encoded DPO pairs; next_batch() -> (x, y, loss_mask) of shape (2B, T),
    rows [0:B] chosen and rows [B:2B] the matching rejected responses."""

    collate = staticmethod(collate_dpo)
