"""Specification of bench/time_to_loss.py and bench/code_corpus.py: a run's time to a target loss is read off
its val curve, ratios are taken against the first run's whole run (nanochat's, when it ran), runs of separate
jobs merge into one table, and the code corpus holds each distinct source
file once."""
import json
import os
import subprocess
import sys

import pytest

from bench.code_corpus import code_sources
from bench.time_to_loss import summarise, time_to
from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NANOCHAT = [{"step": 0, "tokens": 0, "train_s": 0.0, "val_loss": 10.0},
            {"step": 10, "tokens": 1000, "train_s": 30.0, "val_loss": 5.0},
            {"step": 20, "tokens": 2000, "train_s": 50.0, "val_loss": 4.0}]
OURS = [{"step": 0, "tokens": 0, "train_s": 0.0, "val_loss": 10.0},
        {"step": 10, "tokens": 1000, "train_s": 20.0, "val_loss": 4.5},
        {"step": 20, "tokens": 2000, "train_s": 36.0, "val_loss": 3.5}]


def test_time_to_a_target_is_interpolated_between_evaluations_and_none_if_never_reached():
    assert time_to(OURS, 4.0, "train_s") == pytest.approx(28.0)  # halfway from 4.5 (20 s) to 3.5 (36 s)
    assert time_to(OURS, 4.0, "tokens") == pytest.approx(1500)
    assert time_to(OURS, 4.5, "train_s") == pytest.approx(20.0)
    assert time_to(NANOCHAT, 3.0, "train_s") is None


def test_ratios_are_against_the_first_runs_whole_run_and_bits_per_byte_follow_the_loss():
    rows = {r["run"]: r for r in summarise({"nanochat": {"curve": NANOCHAT, "tok_per_s": 40},
                                            "ours": {"curve": OURS, "tok_per_s": 60}}, "nanochat", 3.0, parallel=False)}
    assert rows["nanochat"]["time_ratio"] == 1.0 and rows["nanochat"]["token_ratio"] == 1.0
    assert rows["ours"]["time_ratio"] == pytest.approx(28.0 / 50.0, abs=1e-3)
    assert rows["ours"]["token_ratio"] == pytest.approx(1500 / 2000, abs=1e-3)
    assert rows["ours"]["val_bpb"] == pytest.approx(3.5 / 0.6931471805599453 / 3.0, abs=1e-4)
    # a baseline other than nanochat (AdamW against Muon): the target is its final loss, reached by ours earlier
    rows = {r["run"]: r for r in summarise({"adamw": {"curve": NANOCHAT, "tok_per_s": 40},
                                            "ours": {"curve": OURS, "tok_per_s": 60}}, "adamw", 3.0, parallel=False)}
    assert rows["ours"]["token_ratio"] == pytest.approx(1500 / 2000, abs=1e-3)
    assert rows["adamw"]["val_loss"] == 4.0 and rows["ours"]["s_to_target"] == pytest.approx(28.0)
    parallel = {r["run"]: r for r in summarise({"ours": {"curve": OURS, "tok_per_s": 60},
                                                "slow": {"curve": NANOCHAT, "tok_per_s": 40}}, "ours", 3.0,
                                               parallel=True)}
    assert parallel["ours"]["s_to_target"] is None and parallel["ours"]["time_ratio"] is None
    assert parallel["ours"]["token_ratio"] == 1.0 and parallel["slow"]["tokens_to_target_M"] is None


def test_merge_puts_runs_of_separate_jobs_in_one_table_keeping_each_jobs_command(tmp_path):
    meta = {"device": "GPU", "date": "2026-01-01", "parallel": False, "bytes_per_token": 3.0}
    for name, label, curve in (("a", "nanochat", NANOCHAT), ("b", "ours", OURS)):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump({"meta": {**meta, "command": f"python run {label}"},
                       "runs": {label: {"curve": curve, "tok_per_s": 50, "flags": None}}}, f)
    r = subprocess.run([sys.executable, "bench/time_to_loss.py", "--merge", str(tmp_path / "a.json"),
                        str(tmp_path / "b.json"), "--out_dir", str(tmp_path), "--name", "both"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "both.json") as f:
        doc = json.load(f)
    assert doc["meta"]["runs_by"] == ["python run nanochat", "python run ours"]
    assert {row["run"]: row["time_ratio"] for row in doc["rows"]} == {"nanochat": 1.0, "ours": 0.56}


def test_a_missing_anchor_stops_before_any_run_naming_the_flag(tmp_path):
    # else ours would train for minutes beside a nanochat run that fails at once
    r = subprocess.run([sys.executable, "bench/time_to_loss.py", "--data_path", str(tmp_path), "--runs", "nanochat,ours",
                        "--anchor", str(tmp_path / "nowhere.py"), "--out_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--anchor" in r.stderr and "nowhere.py: no such file" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_a_cpu_run_of_ours_writes_the_table_with_curves(tmp_path):
    data = prepare_default(str(tmp_path / "data"), vocab_size=512, n_stories=300, n_sft=20, n_dpo=10, n_eval=5,
                           quiet=True)
    cmd = [sys.executable, "bench/time_to_loss.py", "--data_path", data, "--runs", "ours,untied",
           "--variant", "untied=--no-tie_word_embeddings", "--depth", "1", "--steps", "4", "--seq_len", "32",
           "--batch_size", "2", "--accumulation_steps", "1", "--eval_interval", "2", "--eval_iters", "1",
           "--work_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path / "results")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "results" / "time_to_loss.json") as f:
        doc = json.load(f)
    assert [row["run"] for row in doc["rows"]] == ["ours", "untied"]
    assert [p["step"] for p in doc["runs"]["ours"]["curve"]] == [0, 2, 4]
    assert doc["meta"]["flags"]["untied"] == "--no-tie_word_embeddings"
    assert "ours's final" in doc["meta"]["target"]


def test_code_corpus_keeps_each_distinct_utf8_source_once_in_path_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.py").write_text("print('x')\n")
    (tmp_path / "b" / "copy.py").write_text("print('x')\n")  # the same bytes under another name
    (tmp_path / "b" / "y.py").write_text("def y():\n    return 1\n")
    (tmp_path / "b" / "latin.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8
    (tmp_path / "b" / "big.py").write_text("#" * 100)
    (tmp_path / "b" / "notes.txt").write_text("not python")
    got = list(code_sources([str(tmp_path / "b"), str(tmp_path / "a")], max_bytes=50))
    assert [os.path.relpath(p, tmp_path) for p, _ in got] == ["a/x.py", "b/y.py"]
    (tmp_path / "b" / "z.h").write_text("int z(void);\n")
    got = code_sources([str(tmp_path / "b")], max_bytes=50, extensions=[".h", ".txt"])
    assert [(os.path.relpath(p, tmp_path), text) for p, text in got] == [("b/notes.txt", "not python"),
                                                                           ("b/z.h", "int z(void);\n")]
