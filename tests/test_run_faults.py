"""Specification of how the three training scripts fail: a user's mistake or a broken environment
(a spent step budget, a foreign or damaged checkpoint, a busy or unusable out_dir, a full disk,
SIGTERM) stops with one `error:` line, leaves every earlier file as it was, and never shows a
Traceback; a legal but surely unintended setting warns and runs on."""
import argparse
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import common
import train_dpo_muon
import train_full_sft_muon
import train_pretrain_muon
from common import EXIT_INTERRUPTED, save_checkpoint
from conftest import one_error, run_main, script_env
from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"pretrain": "train_pretrain_muon.py", "sft": "train_full_sft_muon.py", "dpo": "train_dpo_muon.py"}
MODULES = {"pretrain": train_pretrain_muon, "sft": train_full_sft_muon, "dpo": train_dpo_muon}
# max_seq_len 128: most embedded SFT conversations fit, so SFT and DPO can start from the pretrained model
TINY = {"pretrain": ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                     "--num_key_value_heads", "1", "--max_seq_len", "128", "--batch_size", "4", "--eval_iters", "2",
                     "--log_interval", "1", "--warmup_steps", "2", "--sample_prompt", ""],
        "sft": ["--batch_size", "4", "--eval_iters", "2", "--eval_questions", "0", "--log_interval", "1",
                "--warmup_steps", "2"]}
TINY["dpo"] = TINY["sft"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, vocab_size=512, n_stories=300, n_sft=60, n_dpo=40, n_eval=8, quiet=True)
    return out


def command(stage, data_dir, out_dir, *flags):
    return [sys.executable, SCRIPTS[stage], "--data_path", str(data_dir), "--out_dir", str(out_dir), *TINY[stage],
            *flags]


def run(stage, data_dir, out_dir, *flags, check=True):
    """The script's main() in this process (conftest.run_main): its status, stdout and stderr."""
    r = run_main(*command(stage, data_dir, out_dir, *flags)[1:])
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """One out_dir holding a finished pretrain (4 steps), SFT from it (2 steps) and DPO from that (2 steps).
    Tests copy what they need: nothing here is ever written to again."""
    out = tmp_path_factory.mktemp("finished")
    run("pretrain", data_dir, out, "--max_steps", "4", "--eval_interval", "4")
    run("sft", data_dir, out, "--init_from", str(out / "pretrain.pt"), "--max_steps", "2", "--eval_interval", "2")
    run("dpo", data_dir, out, "--init_from", str(out / "sft.pt"), "--max_steps", "2", "--eval_interval", "2")
    return out


# ------------------------------------------------------------------------------ --resume

def test_resume_with_max_steps_below_the_checkpoint_step_stops_naming_both_and_keeps_the_checkpoint(
        data_dir, finished, tmp_path):
    shutil.copy(finished / "pretrain.pt", tmp_path)
    before = read_bytes(tmp_path / "pretrain.pt")
    error = one_error(run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "2", check=False))
    assert "step 4" in error and "2 steps" in error, error
    assert read_bytes(tmp_path / "pretrain.pt") == before


def test_dpo_resume_with_max_steps_below_the_checkpoint_step_stops_naming_both_and_keeps_the_checkpoint(
        data_dir, finished, tmp_path):
    shutil.copy(finished / "dpo.pt", tmp_path)
    before = read_bytes(tmp_path / "dpo.pt")
    r = run("dpo", data_dir, tmp_path, "--init_from", str(finished / "sft.pt"), "--resume", "--max_steps", "1",
            check=False)
    error = one_error(r)
    assert "step 2" in error and "1 steps" in error, error
    assert read_bytes(tmp_path / "dpo.pt") == before


def test_resuming_another_stages_checkpoint_stops_naming_both_stages_and_keeps_the_file(
        data_dir, finished, tmp_path):
    # an SFT checkpoint where DPO's own is expected, resumed against that same SFT checkpoint
    shutil.copy(finished / "sft.pt", tmp_path / "dpo.pt")
    before = read_bytes(tmp_path / "dpo.pt")
    r = run("dpo", data_dir, tmp_path, "--init_from", str(finished / "sft.pt"), "--resume", "--max_steps", "4",
            check=False)
    error = one_error(r)
    assert "'sft'" in error and "'dpo'" in error, error
    assert read_bytes(tmp_path / "dpo.pt") == before


def test_dpo_resume_against_another_reference_stops_and_keeps_the_checkpoint(data_dir, finished, tmp_path):
    shutil.copy(finished / "dpo.pt", tmp_path)
    other = shutil.copy(finished / "sft.pt", tmp_path / "other_sft.pt")  # same weights, another file
    before = read_bytes(tmp_path / "dpo.pt")
    r = run("dpo", data_dir, tmp_path, "--init_from", str(other), "--resume", "--max_steps", "4", check=False)
    error = one_error(r)
    assert "reference must not change" in error, error
    assert read_bytes(tmp_path / "dpo.pt") == before


def val_steps(path):
    return [row["step"] for row in map(json.loads, open(path)) if "val_loss" in row]


@pytest.mark.parametrize("stage", SCRIPTS)
def test_resume_gets_no_second_val_row_for_the_step_it_continues_from(stage, data_dir, finished, tmp_path):
    for name in (f"{stage}.pt", f"{stage}_metrics.jsonl"):
        shutil.copy(finished / name, tmp_path)
    saved_at = torch.load(tmp_path / f"{stage}.pt", weights_only=True)["step"]
    init = ["--init_from", str(finished / "sft.pt")] if stage == "dpo" else []
    run(stage, data_dir, tmp_path, *init, "--resume", "--max_steps", str(2 * saved_at), "--eval_interval",
        str(saved_at))
    assert val_steps(tmp_path / f"{stage}_metrics.jsonl") == [0, saved_at, 2 * saved_at]


def test_resuming_a_finished_run_with_its_own_step_budget_changes_nothing(data_dir, finished, tmp_path):
    for name in ("pretrain.pt", "pretrain_metrics.jsonl"):
        shutil.copy(finished / name, tmp_path)
    before = {name: read_bytes(tmp_path / name) for name in ("pretrain.pt", "pretrain_metrics.jsonl")}
    r = run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "4", "--eval_interval", "4")
    assert "done:" in r.stdout
    assert {name: read_bytes(tmp_path / name) for name in before} == before


@pytest.mark.parametrize("stage, flags", [("pretrain", ["--batch_size", "2"]),
                                          ("pretrain", ["--accumulation_steps", "2"]),
                                          ("sft", ["--batch_size", "8"])])
def test_resume_with_another_global_batch_stops_naming_old_and_new_and_keeps_every_file(
        stage, flags, data_dir, finished, tmp_path):
    # the step, the schedules, the data position and the logged tokens all count steps of the saved batch
    for name in (f"{stage}.pt", f"{stage}_metrics.jsonl"):
        shutil.copy(finished / name, tmp_path)
    before = {name: read_bytes(tmp_path / name) for name in os.listdir(tmp_path)}
    error = one_error(run(stage, data_dir, tmp_path, "--resume", "--max_steps", "8", *flags, check=False))
    new = 4 * int(flags[1]) if flags[0] == "--accumulation_steps" else int(flags[1])
    assert "global batch of 4" in error and f"has {new}" in error, error
    assert {name: read_bytes(tmp_path / name) for name in before} == before


@pytest.mark.parametrize("flags, saved", [(["--weight_decay", "0.3"], "--weight_decay 0.1"),
                                          (["--no-normuon"], "--normuon"),
                                          (["--ns_coefficients", "polar_express"], "--ns_coefficients quintic"),
                                          (["--seed", "7"], "--seed 1337")])
def test_resume_with_a_setting_the_checkpoint_keeps_stops_naming_the_saved_value(
        flags, saved, data_dir, finished, tmp_path):
    # the optimizers' saved state puts these back over the flags (the seed: the data order), so a changed
    # value would be silently ignored
    shutil.copy(finished / "pretrain.pt", tmp_path)
    before = read_bytes(tmp_path / "pretrain.pt")
    error = one_error(run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "8", *flags, check=False))
    assert saved in error and " ".join(flags) in error, error
    assert read_bytes(tmp_path / "pretrain.pt") == before


def test_resume_may_change_the_learning_rate_which_is_set_every_step(data_dir, finished, tmp_path):
    shutil.copy(finished / "pretrain.pt", tmp_path)
    run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "5", "--eval_interval", "5", "--lr_muon", "0.01",
        "--warmup_steps", "0", "--min_lr_ratio", "1")
    rows = [json.loads(line) for line in open(tmp_path / "pretrain_metrics.jsonl")]
    assert [row["lr_muon"] for row in rows if "loss" in row] == [0.01]


@pytest.mark.parametrize("stage", SCRIPTS)
def test_resume_without_a_checkpoint_says_to_drop_resume_and_creates_nothing(stage, data_dir, tmp_path):
    out = tmp_path / "new_run"
    error = one_error(run(stage, data_dir, out, "--resume", "--max_steps", "2", check=False))
    assert f"no {stage} checkpoint" in error and "drop --resume" in error and "--out_dir" in error, error
    assert "previous stage" not in error, error
    assert not out.exists()


def test_resume_into_the_out_dir_of_another_stage_names_what_it_holds(data_dir, finished, tmp_path):
    shutil.copy(finished / "pretrain.pt", tmp_path)
    error = one_error(run("sft", data_dir, tmp_path, "--resume", "--max_steps", "2", check=False))
    assert "no sft checkpoint" in error and "holds pretrain.pt" in error and "drop --resume" in error, error
    assert sorted(os.listdir(tmp_path)) == ["pretrain.pt"]


# ------------------------------------------------------------------------------ flags

@pytest.mark.parametrize("stage, flag, value", [
    ("pretrain", "--max_steps", "-1"), ("sft", "--lr_muon", "0"), ("dpo", "--batch_size", "0"),
    ("pretrain", "--momentum", "1.5"), ("pretrain", "--seed", str(2 ** 70)), ("sft", "--seed", "-1"),
    ("dpo", "--beta", "0"), ("dpo", "--beta", "-0.1"), ("dpo", "--beta", "nan"), ("sft", "--lr_adamw", "nan"),
    ("pretrain", "--weight_decay", "inf"), ("pretrain", "--warmdown_ratio", "nan"),
    ("pretrain", "--warmdown_ratio", "1.5"), ("pretrain", "--lr_embedding", "-1"), ("sft", "--eval_questions", "-1"),
    ("dpo", "--eval_questions", "-3"), ("pretrain", "--device", "gpu"), ("sft", "--device", "cuda:x")])
def test_an_out_of_range_number_is_refused_at_parse_time_before_anything_is_written(
        stage, flag, value, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [SCRIPTS[stage], "--out_dir", str(out), flag, value])

    def accepted(*_):  # what main() does right after parsing: had the value got through, stop here
        raise AssertionError(f"{flag} {value} was accepted")

    monkeypatch.setattr(MODULES[stage], "setup_run", accepted)
    with pytest.raises(SystemExit) as stop:
        MODULES[stage].main()
    assert stop.value.code == 2  # argparse's usage error
    assert f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_a_cuda_device_past_the_gpus_there_stops_naming_the_ones_there(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as stop:
        common.setup_distributed("cuda:9")
    assert stop.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cuda:9" in errors[0] and "cuda:0 to cuda:1" in errors[0], errors


@pytest.mark.parametrize("stage", SCRIPTS)
def test_help_shows_each_stages_own_defaults(stage, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [SCRIPTS[stage], "--help"])
    with pytest.raises(SystemExit):
        MODULES[stage].parse_args()
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())  # argparse wraps lines
    monkeypatch.setattr(sys, "argv", [SCRIPTS[stage]])
    args = MODULES[stage].parse_args()
    for flag in ("max_steps", "lr_muon", "momentum", "weight_decay", "momentum_warmup_steps", "warmup_steps",
                 "eval_interval", "eval_iters"):
        shown = re.search(rf"--{flag} {flag.upper()} [^(]*\(.*?default: ([^);]+)", text).group(1)
        assert float(shown) == getattr(args, flag), (flag, shown)
    assert "pretraining's default" not in text


# ------------------------------------------------------------------------------ out_dir

@pytest.mark.parametrize("stage, flags", [
    ("pretrain", ["--hidden_size", "30", "--num_attention_heads", "4"]),  # ModelConfig: 30 % 4 != 0
    ("sft", ["--init_from", "no/such/pretrain.pt"])], ids=["bad_shape", "missing_init_from"])
def test_a_run_that_fails_while_starting_leaves_the_previous_metrics_untouched(
        stage, flags, data_dir, finished, tmp_path):
    shutil.copy(finished / f"{stage}_metrics.jsonl", tmp_path)
    before = read_bytes(tmp_path / f"{stage}_metrics.jsonl")
    one_error(run(stage, data_dir, tmp_path, "--max_steps", "2", *flags, check=False))
    assert read_bytes(tmp_path / f"{stage}_metrics.jsonl") == before


def test_a_second_run_into_a_locked_out_dir_stops_at_once(data_dir, tmp_path):
    with open(tmp_path / ".pretrain.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running pretrain holds it
        r = run("pretrain", data_dir, tmp_path, "--max_steps", "2", check=False)
    error = one_error(r)
    assert "another pretrain run" in error and "--out_dir" in error, error
    assert sorted(os.listdir(tmp_path)) == [".pretrain.lock"]  # no metrics, no checkpoint


@pytest.mark.parametrize("where", ["a_regular_file", "under_a_regular_file"])
def test_an_out_dir_that_cannot_be_a_directory_stops_with_one_error(where, data_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" if where == "a_regular_file" else tmp_path / "file" / "out"
    error = one_error(run("pretrain", data_dir, out, "--max_steps", "2", check=False))
    assert "--out_dir" in error, error
    assert (tmp_path / "file").read_text() == "not a directory"


# ------------------------------------------------------------------------------ foreign checkpoints

def write_foreign(kind, path, real_checkpoint):
    if kind == "list":
        torch.save([torch.ones(3), torch.zeros(2)], path)
    elif kind == "bare_state_dict":
        torch.save(torch.load(real_checkpoint, weights_only=True)["model"], path)
    elif kind == "pickled_object":  # loading it would need weights_only=False (running the file's code)
        torch.save({"model": {}, "model_config": argparse.Namespace(hidden_size=32)}, path)
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        data = read_bytes(real_checkpoint)
        path.write_bytes(data[:len(data) // 2])
    return str(path)


FOREIGN = ["list", "bare_state_dict", "pickled_object", "random_bytes", "truncated"]


@pytest.mark.parametrize("kind", FOREIGN)
def test_init_from_a_file_that_is_not_our_checkpoint_stops_with_one_error_without_weights_only_advice(
        kind, data_dir, finished, tmp_path):
    path = write_foreign(kind, tmp_path / "pretrain.pt", finished / "pretrain.pt")
    r = run("sft", data_dir, tmp_path / "out", "--init_from", path, "--max_steps", "2", check=False)
    error = one_error(r)
    assert path in error, error
    assert "weights_only" not in r.stdout + r.stderr  # torch's advice to load it with code execution on
    assert not os.path.exists(tmp_path / "out" / "sft.pt")


@pytest.mark.parametrize("kind", ["truncated", "random_bytes"])
def test_resuming_a_damaged_checkpoint_stops_with_one_error_and_keeps_the_file(kind, data_dir, finished, tmp_path):
    path = write_foreign(kind, tmp_path / "pretrain.pt", finished / "pretrain.pt")
    before = read_bytes(path)
    r = run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "8", check=False)
    error = one_error(r)
    assert path in error, error
    assert "weights_only" not in r.stdout + r.stderr
    assert read_bytes(path) == before


# ------------------------------------------------------------------------------ a full disk

def test_a_full_disk_during_a_save_stops_saying_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "pretrain.pt")
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = read_bytes(path)
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temp file before the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed: No space left on device")

    monkeypatch.setattr(common.torch, "save", full_disk_save)
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert stop.value.code != 0
    assert "disk is full" in capsys.readouterr().err
    monkeypatch.undo()
    assert read_bytes(path) == before and torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["pretrain.pt"]  # no temp file left behind


# ------------------------------------------------------------------------------ SIGTERM

def test_sigterm_after_the_first_logged_step_saves_exits_75_and_the_checkpoint_resumes(data_dir, tmp_path):
    flags = ["--max_steps", "60", "--eval_interval", "1000"]
    proc = subprocess.Popen(command("pretrain", data_dir, tmp_path, *flags), cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "pretrain_metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.02)  # the step-0 eval row, then the first training row
    proc.send_signal(signal.SIGTERM)  # as a scheduler pre-empting the job
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert "interrupted: saved step" in out
    step = torch.load(tmp_path / "pretrain.pt", weights_only=True)["step"]
    assert 0 < step < 60, out[-3000:]
    r = run("pretrain", data_dir, tmp_path, *flags, "--resume")
    assert f"at step {step}" in r.stdout


# ------------------------------------------------------------------------------ warnings

def test_a_warmup_longer_than_the_run_warns_naming_the_flag_and_still_finishes(data_dir, tmp_path):
    r = run("pretrain", data_dir, tmp_path, "--max_steps", "2", "--eval_interval", "2", "--warmup_steps", "5")
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert any("--warmup_steps" in line for line in warnings), r.stdout[-2000:]
    assert torch.load(tmp_path / "pretrain.pt", weights_only=True)["step"] == 2


def test_dpo_pairs_with_identical_replies_are_counted_in_a_warning(data_dir, finished, tmp_path):
    pairs = [{"prompt": f"Is {n} more than {n + 1}?", "chosen": f"No, {n} is less than {n + 1}.",
              "rejected": f"Yes, {n} is more."} for n in range(6)]
    pairs += [{"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hi."},
              {"prompt": "Say bye.", "chosen": "Bye.", "rejected": "Bye."}]
    # replies that part only past the model's 128 tokens: cut there, they are the same reply
    story = "The kite that Mia flew over the hill was red, and so was the one before it. " * 12
    pairs += [{"prompt": f"Tell me of kite {n}.", "chosen": story + "It was red.", "rejected": story + "It was blue."}
              for n in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # the same file as validation set, so all 11 pairs are training pairs
    r = run("dpo", path, tmp_path / "out", "--init_from", str(finished / "sft.pt"), "--val_path", str(path),
            "--max_steps", "1", "--eval_interval", "1")
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert any("2 of 11 pairs" in line and "identical" in line and "dropped" in line for line in warnings), \
        r.stdout[-2000:]
    assert any("3 of 11 pairs differ only after max_seq_len=128" in line and "start from a model pretrained with a longer context" in line
               for line in warnings), r.stdout[-2000:]
    assert "6 pairs kept" in r.stdout


def test_a_second_sigterm_stops_a_run_whose_next_logged_step_is_far_away(data_dir, tmp_path):
    # the first signal waits for the next logged step; a run that will not reach it soon (here a log
    # interval past the end; on a GPU, compile workers killed by the same signal) stops on the second
    flags = ["--max_steps", "1000000", "--log_interval", "1000000", "--eval_interval", "1000000"]
    proc = subprocess.Popen(command("pretrain", data_dir, tmp_path, *flags), cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def wait_for(text):
        deadline = time.time() + 120
        while time.time() < deadline and not any(text in line for line in lines):
            time.sleep(0.02)
        return any(text in line for line in lines)

    try:
        assert wait_for("val loss"), "".join(lines)[-3000:]  # the step-0 eval: training has started
        proc.send_signal(signal.SIGTERM)
        assert wait_for("send it again to stop now"), "".join(lines)[-3000:]
        time.sleep(0.5)
        assert proc.poll() is None, "".join(lines)[-3000:]  # the first signal alone does not stop it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGTERM, "".join(lines)[-3000:]
    finally:
        proc.kill()


@pytest.mark.parametrize("stage", SCRIPTS)
def test_init_from_a_missing_path_names_it_and_what_a_stage_writes(stage, data_dir, tmp_path):
    missing = tmp_path / "nowhere.pt"
    error = one_error(run(stage, data_dir, tmp_path / "run", "--init_from", str(missing), "--max_steps", "2",
                          check=False))
    assert str(missing) in error and "check the path" in error and "previous stage" not in error, error
    assert not (tmp_path / "run" / f"{stage}.pt").exists()


def test_resuming_an_optimizer_state_of_another_layout_stops_with_one_error_and_keeps_the_file(finished, data_dir,
                                                                                               tmp_path):
    ckpt = torch.load(finished / "pretrain.pt", weights_only=False)
    ckpt["adamw_opt"]["param_groups"] = ckpt["adamw_opt"]["param_groups"][:2]  # two groups, as older scripts saved
    torch.save(ckpt, tmp_path / "pretrain.pt")
    before = (tmp_path / "pretrain.pt").read_bytes()
    error = one_error(run("pretrain", data_dir, tmp_path, "--resume", "--max_steps", "8", check=False))
    assert "optimizer state" in error and "--init_from" in error, error
    assert (tmp_path / "pretrain.pt").read_bytes() == before
