"""Specification of the three training loops as one pattern: the same schedules and the same logging
fields in every training row, and fp16's skipped steps counted and kept out of the Muon timing the
same way in every stage."""
import json
import math
import os

import pytest
import torch

from common import save_checkpoint
from conftest import run_main
from data.prepare import prepare_default
from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"pretrain": "train_pretrain_muon.py", "sft": "train_full_sft_muon.py", "dpo": "train_dpo_muon.py"}
INIT_STAGE = {"sft": "pretrain", "dpo": "sft"}
TINY = {"pretrain": ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
                     "--num_key_value_heads", "2", "--max_seq_len", "64", "--batch_size", "8", "--eval_iters", "2",
                     "--log_interval", "1", "--warmup_steps", "2", "--sample_prompt", "", "--lr_adamw", "3e-3"],
        "sft": ["--batch_size", "4", "--eval_iters", "2", "--eval_questions", "0", "--log_interval", "1",
                "--warmup_steps", "2"]}
TINY["dpo"] = TINY["sft"]
# the fields a training row of every stage carries, each meaning the same thing in all three
FIELDS = ("step", "loss", "lr_muon", "lr_adamw", "momentum", "grad_norm", "tok_per_s", "mfu", "mem_gb", "muon_ms",
          "step_ms", "skipped_steps", "elapsed_s")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, vocab_size=512, n_stories=300, n_sft=60, n_dpo=40, n_eval=8, quiet=True)
    return out


@pytest.fixture(scope="module")
def init_ckpts(data_dir, tmp_path_factory):
    """For SFT and DPO: a randomly initialised model saved as the previous stage's checkpoint."""
    d = tmp_path_factory.mktemp("init")
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    paths = {}
    for stage, previous in INIT_STAGE.items():
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, max_seq_len=160)
        paths[stage] = str(d / f"{previous}.pt")
        save_checkpoint(paths[stage], {"stage": previous, "step": 0, "model": GPT(config).state_dict(),
                                       "model_config": vars(config), "tokenizer_fingerprint": tok.fingerprint,
                                       "tokenizer_path": os.path.join(data_dir, "tokenizer.json")})
    return paths


def run(stage, data_path, out_dir, init_ckpts, *flags):
    init = ["--init_from", init_ckpts[stage]] if stage in INIT_STAGE else []
    r = run_main(SCRIPTS[stage], "--data_path", str(data_path), "--out_dir", str(out_dir), *init, *TINY[stage], *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def training_rows(out_dir, stage):
    with open(os.path.join(out_dir, f"{stage}_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [row for row in rows if "loss" in row]  # eval rows carry val_loss instead


# ------------------------------------------------------------------------------ fp16

def short_reply_sft(path):
    """SFT conversations whose reply is one word: a loss averaged over ~2 trained tokens."""
    with open(path, "w") as f:
        for n in range(40):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"What is {n % 9 + 1} and {n * 7 % 9 + 1}?"},
                                                  {"role": "assistant", "content": "yes"}]}) + "\n")
    return path


# CPU autocast fp16 with the GradScaler's initial scale of 2**16 overflows at the first steps when
# the loss is a mean over very few tokens: each token's scaled gradient is 2**16 / n, and the backward
# through the RMSNorms enlarges it past fp16's 65504. A batch of one 8-token window (pretraining), one
# one-word reply (SFT), and one pair with beta 2 (DPO: the gradient of a pair's summed log-prob is
# beta / 2 per token, not averaged over tokens) each skip their first 2-4 steps; the scaler halves its
# scale at every skip, so the later steps run.
FP16 = {"pretrain": ["--batch_size", "1", "--max_seq_len", "8"],
        "sft": ["--batch_size", "1"],
        "dpo": ["--batch_size", "1", "--beta", "2"]}


@pytest.mark.parametrize("stage", SCRIPTS)
def test_fp16_counts_skipped_steps_in_every_row_and_times_muon_only_at_steps_that_ran(
        stage, data_dir, init_ckpts, tmp_path):
    data = short_reply_sft(tmp_path / "sft.jsonl") if stage == "sft" else data_dir
    r = run(stage, data, tmp_path, init_ckpts, *FP16[stage], "--dtype", "float16", "--max_steps", "8",
            "--eval_interval", "8")
    rows = training_rows(tmp_path, stage)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(isinstance(row.get("skipped_steps"), int) for row in rows), rows
    skipped = [row["skipped_steps"] for row in rows]
    ran = [row for row, before in zip(rows, [0] + skipped) if row["skipped_steps"] == before]
    assert skipped[-1] >= 1, skipped  # the overflow did happen, so this test saw a skip
    assert ran, skipped  # ... and the scaler recovered
    for row, before in zip(rows, [0] + skipped):
        if row["skipped_steps"] > before:  # this row's one step was skipped: Muon never ran
            assert row["muon_ms"] is None, row
        else:
            assert isinstance(row["muon_ms"], float) and row["muon_ms"] > 0, row
    assert "skipped (fp16 overflow)" in r.stdout


def test_fp16_resume_continues_the_loss_scale_and_the_skip_count_exactly(data_dir, init_ckpts, tmp_path):
    # the GradScaler's scale is part of the checkpoint: restarting it at 2**16 would skip again
    # constant LR and momentum, so a first part run to --max_steps 4 follows the 8-step run's schedules
    flags = [*FP16["pretrain"], "--dtype", "float16", "--eval_interval", "4", "--min_lr_ratio", "1",
             "--momentum_warmup_steps", "0", "--momentum_cooldown_steps", "0"]
    run("pretrain", data_dir, tmp_path / "straight", init_ckpts, *flags, "--max_steps", "8")
    run("pretrain", data_dir, tmp_path / "split", init_ckpts, *flags, "--max_steps", "4")
    run("pretrain", data_dir, tmp_path / "split", init_ckpts, *flags, "--max_steps", "8", "--resume")
    straight, split = training_rows(tmp_path / "straight", "pretrain"), training_rows(tmp_path / "split", "pretrain")
    assert [r["loss"] for r in straight] == [r["loss"] for r in split]
    assert [r["skipped_steps"] for r in straight] == [r["skipped_steps"] for r in split]


# ------------------------------------------------------------------------------ logging fields

@pytest.fixture(scope="module")
def default_runs(data_dir, init_ckpts, tmp_path_factory):
    """{stage: training rows} of a 3-step run of each stage at the default dtype."""
    rows = {}
    for stage in SCRIPTS:
        out = tmp_path_factory.mktemp(stage)
        run(stage, data_dir, out, init_ckpts, "--max_steps", "3", "--eval_interval", "3")
        rows[stage] = training_rows(out, stage)
    return rows


def test_every_training_row_of_every_stage_carries_the_shared_logging_fields(default_runs):
    for stage, rows in default_runs.items():
        assert [row["step"] for row in rows] == [1, 2, 3], stage
        for row in rows:
            missing = [k for k in FIELDS if k not in row]
            assert not missing, (stage, row["step"], missing)
            for k in FIELDS:
                if k != "mfu":  # no known peak FLOPs on CPU: None
                    assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), (stage, k, row[k])
            assert row["skipped_steps"] == 0 and row["muon_ms"] > 0 and row["tok_per_s"] > 0, (stage, row)


# ------------------------------------------------------------------------------ one schedule

SCHEDULE = ["--lr_muon", "0.01", "--lr_adamw", "1e-3", "--warmup_steps", "2", "--min_lr_ratio", "0.1", "--momentum", "0.95",
            "--momentum_warmup_steps", "2", "--momentum_cooldown_steps", "2", "--max_steps", "6", "--eval_interval", "6"]


def test_every_stage_follows_the_same_learning_rate_and_momentum_schedules(data_dir, init_ckpts, tmp_path):
    logged = {}
    for stage in SCRIPTS:
        cosine = ["--warmdown_ratio", "0"] if stage == "pretrain" else []  # the decay SFT and DPO have
        run(stage, data_dir, tmp_path / stage, init_ckpts, *SCHEDULE, *cosine)
        logged[stage] = [(r["lr_muon"], r["lr_adamw"], r["momentum"]) for r in training_rows(tmp_path / stage, stage)]
    assert logged["sft"] == logged["pretrain"] and logged["dpo"] == logged["pretrain"], logged
    lr_muon = [lr for lr, _, _ in logged["pretrain"]]
    assert lr_muon[0] == pytest.approx(0.005) and lr_muon[1] == pytest.approx(0.01) and lr_muon[-1] < lr_muon[2]
