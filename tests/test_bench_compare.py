"""Specification of bench/compare_optimizers.py: a seed-0 sweep over each optimizer's learning-rate
grid, the best configs rerun at more seeds, and a report of the spread over seeds, token efficiency
and optima on a grid edge."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from bench.compare_optimizers import (best_config, check_extra, data_label, edge_flags, failure, gpu_slots, mean_curve,
                                      spread, steps_within_one_epoch, token_efficiency, tokens_to_reach)
from data.prepare import prepare_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_best_config_has_the_lowest_final_loss_and_failed_runs_never_win():
    losses = {("muon", 0.01, 1e-3): 3.2, ("muon", 0.02, 1e-3): None, ("muon", 0.04, 1e-3): 3.1}
    assert best_config(losses) == ("muon", 0.04, 1e-3)
    assert best_config({("adamw", None, 1e-3): None}) is None


def test_an_optimum_at_either_end_of_a_swept_axis_is_flagged_and_one_inside_is_not():
    grids = {"lr_muon": [0.01, 0.02, 0.04], "lr_adamw": [1e-3, 2e-3, 4e-3]}
    assert edge_flags({"lr_muon": 0.02, "lr_adamw": 2e-3}, grids) == []
    assert edge_flags({"lr_muon": 0.02, "lr_adamw": 4e-3}, grids) == ["lr_adamw"]
    assert edge_flags({"lr_muon": 0.01, "lr_adamw": 1e-3}, grids) == ["lr_muon", "lr_adamw"]
    # an axis with one value was not swept: there is no edge to widen
    assert edge_flags({"lr_muon": 0.02, "lr_adamw": 1e-3}, {"lr_muon": [0.01, 0.02, 0.04], "lr_adamw": [1e-3]}) == []


def test_spread_is_mean_min_max_and_sample_std():
    s = spread([3.0, 3.2, 3.4])
    assert s["mean"] == pytest.approx(3.2) and (s["min"], s["max"]) == (3.0, 3.4)
    assert s["std"] == pytest.approx(0.2)  # sample (n-1) std; the population std would be 0.163
    assert spread([3.0])["std"] is None


def test_mean_curve_averages_seeds_point_by_point_with_their_min_and_max():
    curves = [[(0, 10.0), (100, 6.0)], [(0, 10.0), (100, 4.0)], [(0, 10.0), (100, 5.0)]]
    assert mean_curve(curves) == [(0, 10.0, 10.0, 10.0), (100, 5.0, 4.0, 6.0)]
    with pytest.raises(ValueError):
        mean_curve([[(0, 10.0), (100, 6.0)], [(0, 10.0), (200, 6.0)]])


def test_token_efficiency_interpolates_where_muon_reaches_adamws_final_loss():
    adamw = [(0, 10.0), (100, 8.0), (200, 6.0)]
    muon = [(0, 10.0), (100, 7.0), (200, 5.0)]  # crosses 6.0 half way between the evals at 100 and 200
    assert tokens_to_reach(muon, 6.0) == pytest.approx(150)
    tokens, efficiency = token_efficiency(muon, adamw)
    assert tokens == pytest.approx(150) and efficiency == pytest.approx(200 / 150)
    slower = [(0, 10.0), (100, 9.0), (200, 7.0)]
    assert token_efficiency(slower, adamw) == (None, None)


def test_steps_stay_within_one_epoch_of_the_training_tokens_and_under_the_cap():
    assert steps_within_one_epoch(2_400_000, 8 * 1024, 300) == 292
    assert steps_within_one_epoch(10_000_000, 8 * 1024, 300) == 300
    assert steps_within_one_epoch(1000, 8 * 1024, 300) == 1


def test_results_are_named_after_the_data_directory_a_files_stem_or_an_sft_files_folder(tmp_path):
    tasks = tmp_path / "english_tasks"
    tasks.mkdir()
    (tasks / "sft_train.jsonl").write_text("{}\n")
    assert data_label(str(tasks / "sft_train.jsonl")) == "english_tasks"
    assert data_label(str(tasks) + "/") == "english_tasks"
    (tasks / "books.txt").write_text("text\n")
    assert data_label(str(tasks / "books.txt")) == "books"


def test_concurrent_jobs_are_dealt_round_robin_over_the_gpus():
    assert gpu_slots(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert gpu_slots(3, ["2"]) == ["2", "2", "2"]
    assert gpu_slots(2, []) == [None, None]  # CPU: no CUDA_VISIBLE_DEVICES


def test_a_diverged_run_is_a_sweep_result_and_a_broken_one_says_why(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("step 0 | val loss 9.7\n"
                   "error: val loss is nan at step 50; stopping (the last checkpoint is intact)\n")
    assert failure(str(log)) == "diverged"
    log.write_text("error: loss is inf at step 7; stopping\n[W] a warning printed at exit\n")
    assert failure(str(log)) == "diverged"
    log.write_text("Traceback ...\nerror: --data_path x: no such file or directory\n")
    assert failure(str(log)) == "failed: error: --data_path x: no such file or directory"


def test_extra_flags_may_not_set_what_the_benchmark_sets_per_run():
    check_extra(["--eval_iters", "4", "--hidden_size", "32"])
    for flags in (["--seed", "3"], ["--lr_muon=0.1"], ["--max_steps", "9"]):
        with pytest.raises(SystemExit):
            check_extra(flags)


def test_tiny_sweep_reruns_only_the_best_configs_at_the_second_seed_and_reports_them(tmp_path):
    data = prepare_default(str(tmp_path / "tiny"), vocab_size=512, n_stories=300, n_sft=20, n_dpo=10, n_eval=5,
                           quiet=True)
    work, results = tmp_path / "work", tmp_path / "results"
    tiny = ("--hidden_size 32 --num_hidden_layers 1 --num_attention_heads 2 --num_key_value_heads 1 "
            "--max_seq_len 32 --batch_size 2 --eval_interval 2 --eval_iters 2")
    cmd = [sys.executable, "bench/compare_optimizers.py", "--data_path", data, "--steps", "6", "--seeds", "2",
           "--jobs", "2", "--muon_lrs", "0.01,0.04", "--muon_adamw_lrs", "1e-3", "--adamw_lrs", "2e-3",
           "--work_dir", str(work), "--out_dir", str(results), "--extra", tiny]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(results / "compare_pretrain_cpu_tiny.json") as f:
        table = json.load(f)
    rows = {row["optimizer"]: row for row in table["rows"]}
    sweep = table["sweep"]

    # stage 1 ran the 2x1 Muon grid and the AdamW point at seed 0; the better Muon LR won
    assert set(sweep) == {"muon_m0.01_a0.001_s0", "muon_m0.04_a0.001_s0", "adamw_a0.002_s0"}
    best_muon = min((0.01, 0.04), key=lambda lr: sweep[f"muon_m{lr:g}_a0.001_s0"])
    assert rows["muon"]["lr_muon"] == best_muon and rows["muon"]["lr_adamw"] == 1e-3
    # stage 2 reran only the winners, at seed 1, and the seed changed the result
    other = 0.04 if best_muon == 0.01 else 0.01
    assert (work / f"muon_m{best_muon:g}_a0.001_s1").is_dir() and (work / "adamw_a0.002_s1").is_dir()
    assert not (work / f"muon_m{other:g}_a0.001_s1").exists()
    assert not list(work.glob("*/*.pt"))  # checkpoints are removed
    for opt in ("muon", "adamw"):
        row = rows[opt]
        assert row["seeds"] == 2 and row["tokens"] == 6 * 2 * 32
        assert row["final_val_loss_min"] < row["final_val_loss_max"]
        assert row["final_val_loss_min"] <= row["final_val_loss_mean"] <= row["final_val_loss_max"]
    assert rows["muon"]["optimum_on_grid_edge"] == ["lr_muon"]  # two values: the best is always an end

    # the reported efficiency is the one the mean curves give
    mean = {opt: [(x, m) for x, m, _, _ in c] for opt, c in table["curves"].items()}
    _, efficiency = token_efficiency(mean["muon"], mean["adamw"])
    assert rows["muon"]["token_efficiency"] == (round(efficiency, 2) if efficiency else None)

    command = table["meta"]["command"]
    assert str(tmp_path) not in command and "--data_path data/prepared/tiny" in command
    assert f"--extra={tiny}" in shlex.split(command)  # one word: a value starting with "-" still parses
    md = (results / "compare_pretrain_cpu_tiny.md").read_text()
    assert md.rstrip().splitlines()[-1].startswith("| adamw")
    assert r.stdout.rstrip().splitlines()[-1].startswith("| adamw")  # the table is printed last
