"""End to end on CPU: pretrain -> SFT -> DPO on a small embedded corpus, each stage starting from the
previous stage's checkpoint, with each stage's held-out metric read back from its metrics jsonl."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-layer model and short stages: about a minute on two cores. SFT uses higher LRs than its
# defaults: a model this small and this briefly pretrained needs them to learn the reply format
# within 200 steps.
PRETRAIN = ["--hidden_size", "128", "--num_hidden_layers", "2", "--num_attention_heads", "4",
            "--num_key_value_heads", "2", "--max_seq_len", "160", "--batch_size", "16", "--max_steps", "200",
            "--eval_interval", "200", "--lr_adamw", "3e-3", "--sample_prompt", ""]
SFT = ["--max_steps", "200", "--eval_interval", "200", "--lr_muon", "0.02", "--lr_adamw", "3e-3",
       "--eval_questions", "100"]
DPO = ["--max_steps", "20", "--eval_interval", "20", "--eval_questions", "100"]


def stage(script, *flags):
    r = subprocess.run([sys.executable, script, *flags, "--log_interval", "50"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def evals(path):
    """{step: eval row} of a metrics jsonl."""
    rows = [json.loads(line) for line in open(path)]
    return {row["step"]: row for row in rows if "val_loss" in row}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    data = str(out / "data")
    prepare_default(data, n_stories=4000, n_sft=2000, n_dpo=500, n_eval=100, quiet=True)
    common = ["--data_path", data, "--out_dir", str(out)]
    stage("train_pretrain_muon.py", *common, *PRETRAIN)
    stage("train_full_sft_muon.py", *common, *SFT)  # --init_from defaults to <out_dir>/pretrain.pt
    stage("train_dpo_muon.py", *common, *DPO)  # ... and to <out_dir>/sft.pt
    return out


def test_pretraining_lowers_the_val_loss(pipeline):
    rows = evals(pipeline / "pretrain_metrics.jsonl")
    assert rows[200]["val_loss"] < rows[0]["val_loss"] - 3.0, rows


def test_sft_raises_answer_accuracy_over_the_pretrained_model(pipeline):
    rows = evals(pipeline / "sft_metrics.jsonl")
    before, after = rows[0]["answer_acc"], rows[200]["answer_acc"]
    assert after >= before + 0.05, (before, after)
    assert rows[200]["val_loss"] < rows[0]["val_loss"] - 2.0


def test_dpo_starts_from_the_sft_model_as_its_own_reference(pipeline):
    sft, dpo = evals(pipeline / "sft_metrics.jsonl"), evals(pipeline / "dpo_metrics.jsonl")
    assert dpo[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert dpo[0]["answer_acc"] == sft[200]["answer_acc"]  # the same weights answer the same questions
    ckpt = torch.load(pipeline / "dpo.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["step"] == 20 and ckpt["init_from"].endswith("sft.pt")


def test_dpo_moves_the_held_out_margins(pipeline):
    rows = evals(pipeline / "dpo_metrics.jsonl")
    assert rows[20]["val_loss"] != rows[0]["val_loss"]
    assert 0.0 < rows[20]["val_reward_acc"] < 1.0  # rewards are no longer all tied at zero
    assert 0.0 <= rows[20]["pref_acc"] <= 1.0
