"""data/prepare.py's validation split of real pretraining text: a tenth of a small corpus with a
floor, at most 1M tokens, spread over the text in pieces, within one document if need be."""
import json
import os

import numpy as np
import pytest

from data import prepare
from data.readers import DataError
from data.tokenizer import load_tokenizer


def _prepared(tmp_path, text, **kwargs):
    (tmp_path / "corpus.txt").write_text(text)
    out = str(tmp_path / "out")
    prepare.prepare_files(out, str(tmp_path / "corpus.txt"), vocab_size=300, quiet=True, **kwargs)
    return out, json.load(open(os.path.join(out, "meta.json")))


def _one_long_document(n_sentences):
    return " ".join(f"Mia has {i % 89} red kites and Tom has {i % 83} blue drums." for i in range(n_sentences))


def test_val_is_a_tenth_of_a_corpus_of_a_few_hundred_thousand_tokens():
    assert prepare.val_token_count(500_000) == 50_000


def test_val_of_a_small_corpus_is_raised_to_the_floor():
    assert prepare.val_token_count(200_000) == prepare.VAL_MIN_TOKENS


def test_the_floor_never_takes_more_than_a_fifth_of_the_text():
    assert prepare.val_token_count(50_000) == 10_000


def test_val_of_a_large_corpus_is_capped():
    assert prepare.val_token_count(10**9) == prepare.VAL_MAX_TOKENS


def test_val_fraction_and_cap_can_be_chosen():
    assert prepare.val_token_count(10**7, fraction=0.2, max_tokens=5_000_000) == 2_000_000


def test_too_little_text_to_split_is_a_clear_error():
    with pytest.raises(DataError, match="only 3 tokens: too little to split"):
        prepare.val_token_count(3)


@pytest.mark.parametrize("n_tokens, n_val", [(20, 4), (300_000, 32_768), (10**9, 10**6), (123_457, 24_691)])
def test_val_spans_are_ordered_disjoint_and_hold_exactly_the_val_tokens(n_tokens, n_val):
    spans = prepare.val_spans(n_tokens, n_val)
    assert sum(end - start for start, end in spans) == n_val
    bounds = [x for span in spans for x in span]
    assert bounds == sorted(bounds) and bounds[0] >= 0 and bounds[-1] == n_tokens


def test_val_spans_are_spread_over_the_whole_text():
    spans = prepare.val_spans(10**8, 10**6)
    assert len(spans) == prepare.VAL_MAX_PIECES
    assert spans[0][1] == 10**6 and spans[-1][1] == 10**8  # one piece per hundredth of the text


def test_a_txt_of_one_long_document_is_split_within_it(tmp_path):
    out, meta = _prepared(tmp_path, _one_long_document(4000))  # no blank line: one document
    assert meta["train_docs"] + meta["val_docs"] == 1
    assert meta["val_tokens"] == prepare.val_token_count(meta["train_tokens"] + meta["val_tokens"]) > 1000


def test_train_and_val_together_hold_every_token_once_in_order(tmp_path):
    text = _one_long_document(3000)
    out, meta = _prepared(tmp_path, text)
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    stream = np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.uint16)
    train, val = (np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val"))
    spans = prepare.val_spans(len(stream), len(val))
    assert np.array_equal(val, np.concatenate([stream[a:b] for a, b in spans]))
    is_val = np.zeros(len(stream), dtype=bool)
    for a, b in spans:
        is_val[a:b] = True
    assert np.array_equal(train, stream[~is_val])


def test_no_staging_token_file_is_left_in_the_prepared_directory(tmp_path):
    out, _ = _prepared(tmp_path, _one_long_document(500))
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_preparing_prints_the_train_and_val_sizes(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(_one_long_document(2000))
    prepare.prepare_files(str(tmp_path / "out"), str(tmp_path / "corpus.txt"), vocab_size=300)
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    share = 100 * meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert (f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({share:.1f}%)"
            in capsys.readouterr().out)


def test_meta_records_the_split_settings(tmp_path):
    _, meta = _prepared(tmp_path, _one_long_document(500), val_fraction=0.15, val_max_tokens=5000)
    assert meta["source"]["val_fraction"] == 0.15 and meta["source"]["val_max_tokens"] == 5000
