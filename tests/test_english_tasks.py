"""bench/english_tasks.py: the SFT and DPO sets built from plain-text books."""
import json
import os
import subprocess
import sys

import pytest

from bench.english_tasks import build, halves, passages, title_of
from data.corpus import answer_is_correct
from data.readers import read_dpo_jsonl, read_sft_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paragraph(book, i):
    words = " ".join(f"w{book}x{i}y{j}" for j in range(30))
    return f"Book {book} paragraph {i}: {words}."


def write_books(tmp_path, n_books=5, n_paragraphs=60):
    paths = []
    for b in range(n_books):
        header = f"\ufeffThe Project Gutenberg eBook\r\n\r\nTitle: Book Number {b}\r\n\r\n"
        body = "\r\n\r\n".join(paragraph(b, i) for i in range(n_paragraphs))
        path = tmp_path / f"book_{b}.txt"
        path.write_text(header + body + "\r\n", encoding="utf-8", newline="")
        paths.append(str(path))
    return paths


def test_titles_and_passages_come_from_the_text(tmp_path):
    path = write_books(tmp_path, n_books=1)[0]
    text = open(path, encoding="utf-8", newline="").read()
    assert title_of(path, text) == "Book Number 0"  # CRLF and BOM do not leak into the title
    assert title_of(str(tmp_path / "the_log_school.txt"), "no header") == "the log school"
    found = passages(text)
    assert found and all(p.startswith("Book 0 paragraph") and "\r" not in p and "\n" not in p for p in found)
    # the first and last 5% of paragraphs (licence and headers in real books) are left out
    assert "paragraph 0:" not in " ".join(found) and "paragraph 59:" not in " ".join(found)
    first, second = halves(found[0])
    assert f"{first} {second}" == found[0] and abs(len(first) - len(second)) < 40


def test_splits_are_disjoint_and_every_record_is_well_formed(tmp_path):
    sets = build(write_books(tmp_path), seed=0, per_book=40, val_share=0.1, test_share=0.1)
    assert set(sets) == {"sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val"}
    prompts = {name: {r["conversations"][0]["content"] if "conversations" in r else r["chosen"][0]["content"]
                      for r in recs} for name, recs in sets.items()}
    assert not prompts["sft_train"] & prompts["sft_test"] and not prompts["sft_train"] & prompts["sft_val"]
    assert len(sets["sft_train"]) + len(sets["sft_val"]) + len(sets["sft_test"]) == 5 * 40  # per_book caps
    for r in sets["sft_test"]:  # only the graded task: answer accuracy needs answer and choices everywhere
        assert r["answer"] in r["choices"] and len(set(r["choices"])) == 4
        assert answer_is_correct(r["conversations"][-1]["content"], r["answer"], r["choices"])
    tasks = {r["conversations"][0]["content"].split("?")[0].split(":")[0] for r in sets["sft_train"]}
    assert tasks == {"Which of these books is this passage from", "Continue this passage"}
    for pair in sets["dpo_train"]:
        assert pair["chosen"][:-1] == pair["rejected"][:-1]  # the same question
        assert pair["chosen"][-1]["content"] != pair["rejected"][-1]["content"]
    assert build(write_books(tmp_path), seed=0, per_book=40) == build(write_books(tmp_path), seed=0, per_book=40)


def test_the_command_writes_files_the_stage_scripts_read(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    write_books(books)
    out = tmp_path / "tasks"
    r = subprocess.run([sys.executable, "bench/english_tasks.py", "--books", str(books), "--out_dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sft, dpo = read_sft_jsonl(str(out / "sft_train.jsonl")), read_dpo_jsonl(str(out / "dpo_val.jsonl"))
    assert sft and dpo and all(json.loads(line) for line in open(out / "sft_test.jsonl"))


def test_fewer_than_four_books_cannot_offer_four_choices(tmp_path):
    with pytest.raises(SystemExit, match="at least 4 books"):
        build(write_books(tmp_path, n_books=3))
