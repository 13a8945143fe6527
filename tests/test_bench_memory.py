"""bench/memory.py on CPU: each path runs the pretraining script for a few steps and gets a row with its
tokens/s, and a path that fails is reported in its row, not dropped."""
import json
import os
import subprocess
import sys

from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_path_gets_a_row_with_its_speed_in_the_table(tmp_path):
    data = prepare_default(str(tmp_path / "data"), vocab_size=512, n_stories=300, n_sft=20, n_dpo=10, n_eval=5,
                           quiet=True)
    cmd = [sys.executable, "bench/memory.py", "--data_path", data, "--sets", "64x2", "--paths", "plain,fsdp_ac",
           "--batch_size", "2", "--max_seq_len", "32", "--steps", "4", "--log_interval", "1",
           "--work_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path / "results"), "--name", "m"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.load(open(tmp_path / "results" / "m.json"))["rows"]
    assert [row["path"] for row in rows] == ["plain (one process)", "fsdp_ac"]
    assert all(row["status"] == "ok" and row["tok_per_s"] > 0 for row in rows), rows
    assert "| 64x2 |" in open(tmp_path / "results" / "m.md").read()
