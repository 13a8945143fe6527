"""Specification of bench/throughput.py: one command runs the pretraining script for each model
shape and optimizer and tabulates throughput, memory and the optimizer state each keeps."""
import json
import os
import subprocess
import sys

import pytest

from bench.throughput import run_status
from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cpu_run_tabulates_both_optimizers_and_adamw_keeps_twice_muons_matrix_state(tmp_path):
    data = prepare_default(str(tmp_path / "data"), vocab_size=512, n_stories=300, n_sft=20, n_dpo=10, n_eval=5,
                           quiet=True)
    cmd = [sys.executable, "bench/throughput.py", "--data_path", data, "--sets", "64x2", "--steps", "3",
           "--batch_size", "2", "--max_seq_len", "32", "--accumulation_steps", "2", "--log_interval", "1", "--skip", "1",
           "--work_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path / "results")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "results" / "throughput.json") as f:
        table = json.load(f)
    assert table["meta"]["device"] == "cpu" and "bench/throughput.py" in table["meta"]["command"]
    assert (tmp_path / "results" / "throughput.md").exists()
    assert table["meta"]["batch"].startswith("2 x 32 tokens x 2 micro-batches")
    rows = {row["optimizer"]: row for row in table["rows"]}
    assert set(rows) == {"muon", "adamw"}
    for row in rows.values():
        assert row["status"] == "ok" and row["set"] == "64x2"
        assert row["tok_per_s"] > 0 and row["peak_mem_GB"] > 0
        assert row["mfu_pct"] is None  # no known peak FLOPs on a CPU
        assert row["steady_steps"] == 2  # the first logged interval (step-0 eval, warmup) is left out
        assert row["opt_state_MB"] > row["matrix_state_MB"] > 0  # AdamW's embedding and norms come on top
    assert rows["muon"]["muon_ms"] > 0 and rows["adamw"]["muon_ms"] is None
    # read from each run's saved optimizer state: Muon one buffer per matrix parameter, AdamW two
    assert rows["adamw"]["matrix_state_MB"] / rows["muon"]["matrix_state_MB"] == pytest.approx(2, rel=0.02)
    assert not (tmp_path / "work" / "64x2_muon" / "pretrain.pt").exists()  # checkpoints are removed
    with open(tmp_path / "work" / "64x2_muon" / "pretrain_metrics.jsonl") as f:
        last = [json.loads(line) for line in f if "tok_per_s" in line][-1]
    assert last["tokens"] == 3 * 2 * 2 * 32  # steps x micro-batches x batch x seq: the flag reached the script


def test_a_run_out_of_memory_becomes_a_row_status_not_a_crash():
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert run_status(1, "step 0 | val loss 9.7\nTraceback ...\n" + oom) == "OOM"
    assert run_status(1, "error: --data_path x: no such file") == "failed (exit 1): error: --data_path x: no such file"
    assert run_status(0, "done: 60 steps") == "ok"
