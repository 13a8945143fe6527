"""data/prepare.py: the embedded default, real files, atomic replacement, and the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_main
from data import cache, prepare
from data.corpus import build_corpus
from data.readers import DataError, read_dpo_jsonl, read_sft_jsonl
from data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_stories=200, n_sft=40, n_dpo=20, n_eval=10)
ALL_FILES = {"meta.json", "tokenizer.json", "train.bin", "val.bin", "sft_train.jsonl", "sft_val.jsonl",
             "sft_test.jsonl", "dpo_train.jsonl", "dpo_val.jsonl", "dpo_test.jsonl"}


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "embedded")
    prepare.prepare_default(out, vocab_size=512, quiet=True, **TINY)
    return out


def _snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def test_prepare_default_writes_every_file(tiny_prepared):
    assert set(os.listdir(tiny_prepared)) == ALL_FILES


def test_prepare_default_meta_matches_the_files(tiny_prepared):
    meta = json.load(open(os.path.join(tiny_prepared, "meta.json")))
    tok = load_tokenizer(os.path.join(tiny_prepared, "tokenizer.json"))
    assert meta["vocab_size"] == tok.vocab_size <= 512 and meta["dtype"] == "uint16"
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    for split in ("train", "val"):
        assert os.path.getsize(os.path.join(tiny_prepared, f"{split}.bin")) == 2 * meta[f"{split}_tokens"]
    assert meta["sft"] == {"train": 40, "val": 10, "test": 10} and meta["dpo"] == {"train": 20, "val": 10, "test": 10}
    assert meta["source"]["kind"] == "embedded" and meta["source"]["n_stories"] == 200


def test_prepared_token_file_is_each_story_followed_by_eos(tiny_prepared):
    tok = load_tokenizer(os.path.join(tiny_prepared, "tokenizer.json"))
    tokens = np.fromfile(os.path.join(tiny_prepared, "train.bin"), dtype=np.uint16)
    stories = build_corpus(seed=1337, **TINY)["pretrain"]["train"]
    assert int((tokens == tok.eos_id).sum()) == len(stories)
    first = tokens[: int(np.argmax(tokens == tok.eos_id))]
    assert tok.decode(first.tolist()) == stories[0]


def test_prepared_chat_files_read_back_with_the_readers(tiny_prepared):
    sft = read_sft_jsonl(os.path.join(tiny_prepared, "sft_val.jsonl"))
    dpo = read_dpo_jsonl(os.path.join(tiny_prepared, "dpo_test.jsonl"))
    assert len(sft) == len(dpo) == 10
    assert {"conversations", "answer", "choices"} <= set(sft[0])
    assert {"chosen", "rejected", "answer", "choices"} <= set(dpo[0])


def test_ensure_prepared_prepares_only_when_meta_is_missing(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "emb")
    cache.ensure_prepared(out, vocab_size=300, quiet=True, **TINY)
    assert "preparing the embedded default data in" in capsys.readouterr().out
    monkeypatch.setattr(prepare, "prepare_default", lambda *a, **k: pytest.fail("prepared twice"))
    assert cache.ensure_prepared(out) == out


def test_ensure_prepared_regenerates_a_corpus_made_by_other_corpus_code(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "emb")
    prepare.prepare_default(out, vocab_size=300, quiet=True, **TINY)
    meta_path = os.path.join(out, "meta.json")
    meta = json.load(open(meta_path))
    assert meta["source"]["corpus_fingerprint"] == cache.corpus_fingerprint()
    meta["source"]["corpus_fingerprint"] = "0123456789abcdef"  # as if data/corpus.py changed since
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    cache.ensure_prepared(out, quiet=True)
    assert "regenerating" in capsys.readouterr().out
    again = json.load(open(meta_path))
    assert again["source"] == {**meta["source"], "corpus_fingerprint": cache.corpus_fingerprint()}
    assert again["vocab_size"] == meta["vocab_size"]  # made again with the same arguments


def _real_inputs(d):
    d.mkdir()
    (d / "pre").mkdir()
    (d / "pre" / "a.txt").write_text("\n\n".join(f"Story {i}: Mia has {i} red kites." for i in range(300)))
    (d / "pre" / "b.jsonl").write_text("".join(json.dumps({"text": f"Tom walked to Oakvale {i} times."}) + "\n" for i in range(100)))
    def msgs(i):
        return [{"role": "user", "content": f"How many kites? {i}"}, {"role": "assistant", "content": f"{i}."}]

    (d / "sft.jsonl").write_text("".join(json.dumps({"messages": msgs(i)}) + "\n" for i in range(50)))
    (d / "dpo.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) + "\n" for i in range(30)))
    return d


def test_prepare_files_tokenizes_real_data_and_splits_off_val(tmp_path):
    src = _real_inputs(tmp_path / "src")
    out = str(tmp_path / "out")
    prepare.prepare_files(out, str(src / "pre"), str(src / "sft.jsonl"), str(src / "dpo.jsonl"), vocab_size=300, quiet=True)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["train_docs"] + meta["val_docs"] == 400  # each document's eos lands in one split
    assert meta["val_tokens"] == prepare.val_token_count(meta["train_tokens"] + meta["val_tokens"])
    assert meta["sft"] == {"train": 49, "val": 1} and meta["dpo"] == {"train": 29, "val": 1}
    sft = read_sft_jsonl(os.path.join(out, "sft_train.jsonl"))
    assert list(sft[0]) == ["conversations"]  # HF "messages" normalised
    assert set(os.listdir(out)) == ALL_FILES - {"sft_test.jsonl", "dpo_test.jsonl"}


def test_prepare_files_with_an_existing_tokenizer_keeps_its_fingerprint(tiny_prepared, tmp_path):
    src = _real_inputs(tmp_path / "src")
    tok_path = os.path.join(tiny_prepared, "tokenizer.json")
    out = str(tmp_path / "out")
    prepare.prepare_files(out, str(src / "pre" / "a.txt"), tokenizer=tok_path, quiet=True)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["tokenizer_fingerprint"] == load_tokenizer(tok_path).fingerprint


@pytest.mark.parametrize("bad", ["pretrain_line", "sft_role"])
def test_bad_input_leaves_existing_prepared_data_untouched(tmp_path, bad):
    out = str(tmp_path / "out")
    prepare.prepare_default(out, vocab_size=300, quiet=True, **TINY)
    before = _snapshot(out)
    src = _real_inputs(tmp_path / "src")
    if bad == "pretrain_line":  # found late, during tokenization into the staging dir
        with open(src / "pre" / "b.jsonl", "a") as f:
            f.write('{"text": "unterminated\n')
    else:
        with open(src / "sft.jsonl", "a") as f:
            f.write(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError):
        prepare.prepare_files(out, str(src / "pre"), str(src / "sft.jsonl"), vocab_size=300, quiet=True)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no staging dir left behind


def test_prepare_help_runs_as_a_script_from_the_repo_root():
    r = subprocess.run([sys.executable, "data/prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--pretrain_path" in r.stdout


def test_prepare_cli_bad_input_exits_1_with_one_clear_line(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    r = run_main("data/prepare.py", "--pretrain_path", missing, "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {missing}: no such file or directory"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, rule", [
    ("--vocab_size", "260", "an integer >= 261 and <= 4294967296"),
    ("--num_threads", "0", "an integer >= 1"),
    ("--seed", "-1", "an integer >= 0 and <= 18446744073709551615"),
    ("--seed", str(2**70), "an integer >= 0 and <= 18446744073709551615"),
    ("--val_fraction", "0", "a number > 0 and <= 0.5"),
    ("--val_fraction", "0.6", "a number > 0 and <= 0.5"),
    ("--val_max_tokens", "0", "an integer >= 1"),
    ("--tokenizer_max_chars", "0", "an integer >= 1"),
    ("--n_stories", "0", "an integer >= 1"),
    ("--n_eval", "ten", "an integer >= 1"),
])
def test_prepare_cli_refuses_out_of_range_numbers_naming_the_flag_and_range(tmp_path, capsys, flag, value, rule):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--out_dir", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be {rule}, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prepare_cli_accepts_the_smallest_vocab_size(tmp_path):
    src = _real_inputs(tmp_path / "src")
    prepare.main(["--pretrain_path", str(src / "pre" / "a.txt"), "--out_dir", str(tmp_path / "o"),
                  "--vocab_size", str(prepare.MIN_VOCAB_SIZE), "--num_threads", "1"])
    assert json.load(open(tmp_path / "o" / "meta.json"))["vocab_size"] == prepare.MIN_VOCAB_SIZE


def test_prepare_cli_names_an_unsupported_file_type_and_the_accepted_ones(tmp_path):
    (tmp_path / "good.csv").write_text("text\nhello\n")
    r = run_main("data/prepare.py", "--pretrain_path", str(tmp_path / "good.csv"), "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "good.csv: unsupported file type; pretraining text must be a .txt, .jsonl, .parquet file" in r.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_cli_names_the_files_of_a_folder_it_would_not_read(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("one document\n\nanother")
    (folder / "more.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    r = run_main("data/prepare.py", "--pretrain_path", str(folder), "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "more.jsonl.gz" in r.stderr and ".txt, .jsonl, .parquet" in r.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_cli_names_the_file_and_line_of_a_lone_surrogate(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800"}\n')
    r = run_main("data/prepare.py", "--pretrain_path", str(src), "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {src}:2: a lone UTF-16 surrogate") and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
