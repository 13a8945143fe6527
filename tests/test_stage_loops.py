"""Specification of the three training loops as one pattern: the same schedules, compile, copy,
clip and step code in each script, the same logging fields in every training row, and fp16's
skipped steps counted and kept out of the Muon timing the same way in every stage."""
import ast
import difflib
import inspect
import itertools
import json
import math
import os

import pytest
import torch

from common import clip_grads, save_checkpoint
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


# ------------------------------------------------------------------------------ one pattern

def source(stage):
    with open(os.path.join(ROOT, SCRIPTS[stage])) as f:
        return f.read()


def calls(stage, match):
    """The calls in a script's source for which match(call node) is true."""
    return [node for node in ast.walk(ast.parse(source(stage)))
            if isinstance(node, ast.Call) and match(node)]


def function_source(stage, name):
    text = source(stage)
    defs = [node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(defs) == 1, (stage, name)
    return ast.get_source_segment(text, defs[0])


@pytest.mark.parametrize("name", ["cosine_lr", "muon_momentum"])
def test_the_schedules_are_the_same_source_in_the_three_scripts(name):
    sources = {stage: function_source(stage, name) for stage in SCRIPTS}
    assert sources["sft"] == sources["pretrain"] and sources["dpo"] == sources["pretrain"], sources


def test_every_script_compiles_the_raw_model_with_static_shapes():
    for stage in SCRIPTS:
        compiles = calls(stage, lambda c: ast.unparse(c.func) == "torch.compile")
        assert [ast.unparse(c) for c in compiles] == ["torch.compile(raw_model, dynamic=False)"], stage


def test_every_script_pins_host_memory_before_the_copy_to_the_device():
    for stage in SCRIPTS:
        pins = calls(stage, lambda c: isinstance(c.func, ast.Attribute) and c.func.attr == "pin_memory")
        copies = calls(stage, lambda c: isinstance(c.func, ast.Attribute) and c.func.attr == "to"
                       and any(k.arg == "non_blocking" and ast.unparse(k.value) == "True" for k in c.keywords))
        assert pins and copies, stage
        assert max(c.lineno for c in pins) < min(c.lineno for c in copies), stage  # pinned, then copied


def test_every_script_clips_with_clip_grads_and_no_host_sync_argument():
    assert list(inspect.signature(clip_grads).parameters) == ["muon_opt", "muon_params", "adamw_params", "max_norm",
                                                              "world_size"]
    clips = {stage: [ast.unparse(c) for c in calls(stage, lambda c: ast.unparse(c.func) == "clip_grads")]
             for stage in SCRIPTS}
    want = "clip_grads(muon_opt, muon_params, adamw_params, args.grad_clip, world_size)"
    assert clips == {stage: [want] for stage in SCRIPTS}, clips


def loop_section(stage):
    """From the split and the two optimizers to the final `done:` line: the training loop of a script."""
    lines = source(stage).splitlines()
    start = next(i for i, line in enumerate(lines) if "the split and the two optimizers" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith('    print0(f"done:'))
    return lines[start:end]


# The three sections differ in their batch, loss, eval and stage-specific log fields. Counted on the
# scripts as they stand: pretrain-sft 50, sft-dpo 40, pretrain-dpo 72 changed lines; 80 leaves room
# for a small edit, not for a loop that grows a different structure in one script.
MAX_LOOP_DIFF_LINES = 80


@pytest.mark.parametrize("a, b", list(itertools.combinations(SCRIPTS, 2)))
def test_the_loops_of_any_two_scripts_differ_by_few_lines(a, b):
    changed = [line for line in difflib.unified_diff(loop_section(a), loop_section(b), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) <= MAX_LOOP_DIFF_LINES, "\n".join(changed)
