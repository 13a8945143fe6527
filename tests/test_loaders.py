"""Batch loaders: token-window determinism and resume, SFT padding/masking/truncation, DPO layout."""
import io
import json

import numpy as np
import pytest
import torch

from data.chat import render_conversation
from data.loaders import (DPOLoader, SFTLoader, TokenWindowLoader, encode_dpo, encode_sft, eval_batches,
                          write_tokens)
from data.readers import DataError
from data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [f"Mia has {i} red kites. Tom asked what colour the kite is, and she said red." for i in range(200)]
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture
def token_file(tmp_path):
    path = str(tmp_path / "train.bin")
    write_tokens(path, [np.arange(i * 1000, (i + 1) * 1000) % 1000 for i in range(5)], vocab_size=1000)
    return path


def _convo(q, a):
    return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# token files and random windows


def test_write_tokens_uses_uint16_below_65536_and_uint32_above(tmp_path):
    n16 = write_tokens(str(tmp_path / "a.bin"), [[1, 2, 3], [65534]], vocab_size=65535)
    n32 = write_tokens(str(tmp_path / "b.bin"), [[1, 2, 3], [70000]], vocab_size=70001)
    assert (n16, n32) == (4, 4)
    assert (tmp_path / "a.bin").stat().st_size == 8 and (tmp_path / "b.bin").stat().st_size == 16


def test_write_tokens_refuses_ids_outside_the_vocab(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(str(tmp_path / "a.bin"), [[5, 999]], vocab_size=100)
    assert not list(tmp_path.iterdir())


def test_windows_are_int64_and_y_is_x_shifted_by_one(token_file):
    loader = TokenWindowLoader(token_file, batch_size=4, seq_len=16, dtype=np.uint16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 1000)  # the file counts 0..999 repeatedly
    assert loader.num_tokens == 5000


def test_same_seed_and_rank_give_the_same_batches(token_file):
    a = TokenWindowLoader(token_file, 4, 16, seed=3, dtype=np.uint16)
    b = TokenWindowLoader(token_file, 4, 16, seed=3, dtype=np.uint16)
    assert all(_same(a.next_batch(), b.next_batch()) for _ in range(5))


def test_different_ranks_get_different_batches(token_file):
    r0 = TokenWindowLoader(token_file, 4, 16, rank=0, world_size=2, dtype=np.uint16)
    r1 = TokenWindowLoader(token_file, 4, 16, rank=1, world_size=2, dtype=np.uint16)
    assert not _same(r0.next_batch(), r1.next_batch())


def test_ranks_together_see_the_global_batch_of_one_process(token_file):
    whole = TokenWindowLoader(token_file, 8, 16, seed=2, dtype=np.uint16)
    parts = [TokenWindowLoader(token_file, 4, 16, rank=r, world_size=2, seed=2, dtype=np.uint16) for r in (0, 1)]
    for _ in range(3):
        x, y = whole.next_batch()
        halves = [p.next_batch() for p in parts]
        assert torch.equal(x, torch.cat([h[0] for h in halves])) and torch.equal(y, torch.cat([h[1] for h in halves]))


def test_different_seeds_give_different_batches(token_file):
    a = TokenWindowLoader(token_file, 4, 16, seed=0, dtype=np.uint16)
    b = TokenWindowLoader(token_file, 4, 16, seed=1, dtype=np.uint16)
    assert not _same(a.next_batch(), b.next_batch())


def test_resume_from_state_dict_continues_the_same_stream(token_file):
    a = TokenWindowLoader(token_file, 4, 16, seed=7, dtype=np.uint16)
    for _ in range(3):
        a.next_batch()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = TokenWindowLoader(token_file, 4, 16, seed=0, dtype=np.uint16)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert _same(a.next_batch(), b.next_batch())


def test_dtype_comes_from_meta_json_next_to_the_file(tmp_path):
    path = str(tmp_path / "train.bin")
    write_tokens(path, [[70000, 1, 2, 3, 4]], vocab_size=70001)
    (tmp_path / "meta.json").write_text('{"dtype": "uint32"}')
    x, _ = TokenWindowLoader(path, 1, 4).next_batch()
    assert x.tolist() == [[70000, 1, 2, 3]]


def test_file_shorter_than_seq_len_plus_one_is_a_clear_error(tmp_path):
    path = str(tmp_path / "tiny.bin")
    write_tokens(path, [[1, 2, 3, 4]], vocab_size=10)
    with pytest.raises(DataError, match="has 4 tokens, fewer than seq_len\\+1 = 5"):
        TokenWindowLoader(path, 1, 4, dtype=np.uint16)


def test_missing_token_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such token file"):
        TokenWindowLoader(str(tmp_path / "nope.bin"), 1, 4)


def test_token_file_ending_in_part_of_a_token_is_a_clear_error(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(str(path), [np.arange(100)], vocab_size=1000)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"train\.bin: 199 bytes is not a whole number of uint16 tokens.*prepare"):
        TokenWindowLoader(str(path), 1, 4)


def test_token_file_shorter_than_meta_json_records_is_a_clear_error(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(str(path), [np.arange(100)], vocab_size=1000)
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", "train_tokens": 150}')
    with pytest.raises(DataError, match=r"train\.bin: holds 100 tokens but meta.json records 150.*prepare"):
        TokenWindowLoader(str(path), 1, 4)


def test_eval_batches_refuse_a_truncated_token_file(tmp_path):
    path = tmp_path / "val.bin"
    write_tokens(str(path), [np.arange(100)], vocab_size=1000)
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", "val_tokens": 101}')
    with pytest.raises(DataError, match=r"val\.bin: holds 100 tokens but meta.json records 101"):
        next(eval_batches(str(path), 1, 4))


def test_empty_token_file_is_a_clear_error(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"train\.bin: token file is empty"):
        TokenWindowLoader(str(tmp_path / "train.bin"), 1, 4)


def test_missing_token_file_of_a_chat_only_directory_says_it_had_no_pretraining_text(tmp_path):
    (tmp_path / "meta.json").write_text('{"sft": {"train": 10, "val": 1}}')
    with pytest.raises(DataError, match="prepared without pretraining text"):
        TokenWindowLoader(str(tmp_path / "train.bin"), 1, 4)


def test_malformed_meta_json_is_a_clear_error(tmp_path):
    write_tokens(str(tmp_path / "train.bin"), [np.arange(100)], vocab_size=1000)
    (tmp_path / "meta.json").write_text('{"dtype": ')
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        TokenWindowLoader(str(tmp_path / "train.bin"), 1, 4)


def _prepared_tokens(folder, tok, **meta):
    folder.mkdir(exist_ok=True)
    write_tokens(str(folder / "train.bin"), [np.arange(300) % tok.vocab_size], vocab_size=tok.vocab_size)
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": 300, **meta}))
    return str(folder / "train.bin")


def test_a_token_file_of_its_own_tokenizer_loads(tok, tmp_path):
    path = _prepared_tokens(tmp_path / "d", tok, vocab_size=tok.vocab_size, tokenizer_fingerprint=tok.fingerprint)
    assert TokenWindowLoader(path, 1, 4, tokenizer=tok).num_tokens == 300


def test_a_token_file_written_by_another_tokenizer_is_refused_naming_the_folder(tok, tmp_path):
    path = _prepared_tokens(tmp_path / "d", tok, vocab_size=tok.vocab_size, tokenizer_fingerprint="0123456789abcdef")
    with pytest.raises(DataError, match=rf"{tmp_path / 'd'}: its token files were written by another tokenizer "
                                        rf"\(meta.json: vocab 320, fingerprint 0123456789abcdef\).*prepare .* again"):
        TokenWindowLoader(path, 1, 4, tokenizer=tok)


def test_a_token_file_recording_another_vocab_size_is_refused(tok, tmp_path):
    path = _prepared_tokens(tmp_path / "d", tok, vocab_size=4096)
    with pytest.raises(DataError, match="written by a tokenizer of 4096 tokens"):
        TokenWindowLoader(path, 1, 4, tokenizer=tok)


def test_a_token_file_without_a_recorded_tokenizer_is_refused_for_ids_past_the_vocab(tok, tmp_path):
    path = str(tmp_path / "train.bin")
    write_tokens(path, [np.arange(400)], vocab_size=1000)
    with pytest.raises(DataError, match=r"train\.bin: holds token id 399, past the 320 tokens of"):
        TokenWindowLoader(path, 1, 4, tokenizer=tok)


def test_eval_batches_split_a_fixed_set_evenly_between_ranks(tmp_path):
    path = str(tmp_path / "val.bin")
    write_tokens(path, [np.arange(5000)], vocab_size=5000)  # token value == position
    r0 = list(eval_batches(path, 2, 16, rank=0, world_size=2, dtype=np.uint16))
    r1 = list(eval_batches(path, 2, 16, rank=1, world_size=2, dtype=np.uint16))
    assert len(r0) == len(r1) > 0
    starts = sorted(int(x[i, 0]) for x, _ in r0 + r1 for i in range(2))
    assert starts == [16 * k for k in range(len(starts))]  # consecutive, non-overlapping windows


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_padding_is_never_in_the_loss(tok):
    examples = [_convo("Hi?", "Red."), _convo("What colour is the kite that Mia has at home?", "It is red, Tom.")]
    encoded, _ = encode_sft(tok, examples, max_seq_len=64)
    x, y, mask = SFTLoader(encoded, batch_size=2, pad_id=tok.pad_id).next_batch()
    lengths = [len(ids) - 1 for ids, _ in encoded]
    assert x.shape[1] == max(lengths)
    short = lengths.index(min(lengths))
    pad = slice(min(lengths), None)
    assert (mask[short, pad] == 0).all() and (y[short, pad] == -1).all() and (x[short, pad] == tok.pad_id).all()
    assert (y[mask.bool()] >= 0).all()


def test_sft_loss_mask_is_aligned_with_the_targets(tok):
    ex = _convo("Which colour?", "Red, of course.")
    ids, mask = render_conversation(tok, ex["conversations"])
    encoded, _ = encode_sft(tok, [ex], max_seq_len=64)
    x, y, m = SFTLoader(encoded, batch_size=1).next_batch()
    assert tok.decode(y[0][m[0].bool()].tolist()) == "Red, of course.<|im_end|>"
    assert x[0].tolist() == ids[:-1] and m[0].tolist() == mask[1:]


def test_sft_long_examples_are_truncated_and_counted(tok):
    short, long = _convo("Hi?", "Red."), _convo("Hi?", "red " * 100)
    encoded, n_truncated = encode_sft(tok, [short, long, long], max_seq_len=32)
    assert n_truncated == 2 and len(encoded) == 3
    assert max(len(ids) for ids, _ in encoded) == 33


def test_sft_examples_whose_answer_would_be_cut_entirely_are_dropped(tok):
    long_question = _convo("what colour " * 100, "Red.")
    encoded, n_truncated = encode_sft(tok, [_convo("Hi?", "Red."), long_question], max_seq_len=32)
    assert n_truncated == 1 and len(encoded) == 1


def test_sft_nothing_left_after_truncation_is_an_error(tok):
    with pytest.raises(DataError, match="max_seq_len=8"):
        encode_sft(tok, [_convo("what colour " * 20, "Red.")], max_seq_len=8)


def test_sft_epoch_order_is_deterministic_and_ranks_are_disjoint(tok):
    encoded, _ = encode_sft(tok, [_convo(f"Q{i}?", f"A{i}.") for i in range(12)], max_seq_len=64)
    seen = {}
    for rank in (0, 1):
        loader = SFTLoader(encoded, batch_size=2, rank=rank, world_size=2, seed=5)
        again = SFTLoader(encoded, batch_size=2, rank=rank, world_size=2, seed=5)
        batches = [loader.next_batch() for _ in range(3)]
        assert all(_same(b, again.next_batch()) for b in batches)
        seen[rank] = {tuple(row.tolist()) for b in batches for row in b[0]}
        assert loader.epoch == 0
        loader.next_batch()
        assert loader.epoch == 1
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_sft_resume_from_state_dict_continues_across_epochs(tok):
    encoded, _ = encode_sft(tok, [_convo(f"Q{i}?", f"A{i}.") for i in range(6)], max_seq_len=64)
    a = SFTLoader(encoded, batch_size=2, seed=1)
    for _ in range(4):  # into the second epoch
        a.next_batch()
    b = SFTLoader(encoded, batch_size=2, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 1
    assert all(_same(a.next_batch(), b.next_batch()) for _ in range(4))


def test_sft_fewer_examples_than_one_batch_is_a_clear_error(tok):
    encoded, _ = encode_sft(tok, [_convo("Q?", "A.")] * 3, max_seq_len=64)
    with pytest.raises(DataError, match="fewer than batch_size x world_size"):
        SFTLoader(encoded, batch_size=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# DPO


def _pair(q, good, bad):
    user = {"role": "user", "content": q}
    return {"chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}]}


def test_dpo_batch_stacks_chosen_rows_then_rejected_rows(tok):
    pairs = [_pair("Colour?", "Red.", "Blue is the colour, surely."), _pair("Kites?", "Mia has two kites.", "None.")]
    encoded, _ = encode_dpo(tok, pairs, max_seq_len=64)
    x, y, mask = DPOLoader(encoded, batch_size=2, pad_id=tok.pad_id).next_batch()
    assert x.shape[0] == 4 and x.shape == y.shape == mask.shape
    decoded = [tok.decode(y[r][mask[r].bool()].tolist()) for r in range(4)]
    chosen, rejected = decoded[:2], decoded[2:]
    # the order is shuffled, so match rows by content: row i + B must be row i's rejected partner
    partner = {p["chosen"][1]["content"] + "<|im_end|>": p["rejected"][1]["content"] + "<|im_end|>" for p in pairs}
    assert sorted(chosen) == sorted(partner) and [partner[c] for c in chosen] == rejected
    assert (y == -1).any()  # rows of different lengths are padded to one common T


def test_dpo_pair_is_dropped_when_either_response_is_cut_entirely(tok):
    pairs = [_pair("Colour?", "Red.", "Blue."), _pair("colour " * 60, "Red.", "Blue.")]
    encoded, counts = encode_dpo(tok, pairs, max_seq_len=40)
    assert len(encoded) == 1 and counts == {"truncated": 1, "no_reply": 1, "identical": 0, "identical_cut": 0}
    assert set(encoded[0]) == {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}


def test_dpo_pairs_that_differ_only_after_the_cut_are_dropped_and_counted(tok):
    shared = "Mia has red kites and Tom asked what colour the kite is. " * 4
    pairs = [_pair("Colour?", shared + "Red.", shared + "Blue."), _pair("Colour?", "Red.", "Blue.")]
    encoded, counts = encode_dpo(tok, pairs, max_seq_len=40)
    assert counts == {"truncated": 1, "no_reply": 0, "identical": 0, "identical_cut": 1}
    assert len(encoded) == 1 and len(encoded[0]["chosen_ids"]) < 40  # the short pair is the one kept
    encoded, counts = encode_dpo(tok, pairs, max_seq_len=200)  # a context long enough to see them differ
    assert len(encoded) == 2 and counts["identical_cut"] == 0


def test_dpo_pairs_with_identical_replies_are_dropped_and_counted(tok):
    pairs = [_pair("Colour?", "Red.", "Red."), _pair("Colour?", "Red.", "Blue.")]
    encoded, counts = encode_dpo(tok, pairs, max_seq_len=64)
    assert len(encoded) == 1 and counts["identical"] == 1 and counts["identical_cut"] == 0


def test_dpo_with_every_pair_identical_within_the_cut_says_to_raise_max_seq_len(tok):
    shared = "Mia has red kites and Tom asked what colour the kite is. " * 4
    pairs = [_pair("Colour?", shared + "Red.", shared + "Blue."), _pair("Kites?", shared + "Two.", shared + "One.")]
    with pytest.raises(DataError, match=r"pairs\.jsonl: no DPO pair is left to train on within max_seq_len=40 "
                                        r"\(2 differ only after it\); shorten the pairs, or start from a model pretrained with a longer context"):
        encode_dpo(tok, pairs, max_seq_len=40, source="pairs.jsonl")


def test_dpo_with_only_identical_replies_says_to_fix_the_data(tok):
    with pytest.raises(DataError, match=r"\(1 have the same chosen and rejected reply\); fix the data"):
        encode_dpo(tok, [_pair("Colour?", "Red.", "Red.")], max_seq_len=64)
