"""Specification of train_pretrain_muon.py: runs end to end on CPU, single and multi-process, resumes
exactly, survives a crash mid-save, and stops clearly on bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from common import EXIT_INTERRUPTED, micro_steps, save_checkpoint, shard
from conftest import run_finished_script, run_main, run_ranks, script_env
from data.prepare import prepare_default
from model import GPT, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
        "--num_key_value_heads", "2", "--max_seq_len", "64", "--batch_size", "8", "--eval_iters", "4",
        "--log_interval", "1", "--warmup_steps", "5", "--sample_prompt", "", "--lr_adamw", "3e-3"]
COMPARED = ("loss", "lr_muon", "lr_adamw", "momentum", "grad_norm", "val_loss")
# every Muon option at once, with weight decay for the cautious mask to act on
ALL_OPTIONS = ["--ns_coefficients", "polar_express", "--normuon", "--cautious_wd", "--weight_decay", "0.1",
               "--momentum_warmup_steps", "10", "--momentum_cooldown_steps", "5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, vocab_size=512, n_stories=3000, n_sft=200, n_dpo=100, n_eval=20, quiet=True)
    return out


def pretrain(data_dir, out_dir, *flags, nproc=1, check=True, torchrun=False):
    """One process: the script's main() in this process (conftest.run_main); more, or torchrun=True: as
    torchrun's ranks (conftest.run_ranks)."""
    args = ["train_pretrain_muon.py", "--data_path", data_dir, "--out_dir", str(out_dir), *TINY, *flags]
    if nproc == 1 and not torchrun:
        r = run_main(*args)
    else:
        r = run_ranks(nproc, *args)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(out_dir):
    """{step: merged row} from the metrics jsonl (train and eval rows of a step merged)."""
    rows = {}
    with open(os.path.join(out_dir, "pretrain_metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return rows


def assert_follows(a, b, last):
    """Run b's metrics follow run a's through step `last`: same data and math, the float sums in another order
    (all-reduce, reduce-scatter). The gradient norm at the peak LR is the most sensitive figure: rounding the
    clip norm differently in a one-process run alone moves its step-7 norm by 0.2%."""
    for step in range(1, last + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 2e-3 * a[step]["loss"], step
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) < 2e-2 * a[step]["grad_norm"], step
    assert abs(a[last]["val_loss"] - b[last]["val_loss"]) < 5e-3 * a[last]["val_loss"]


def test_default_flags_run_end_to_end_and_write_checkpoint_and_metrics(data_dir, tmp_path):
    r = pretrain(data_dir, tmp_path, "--max_steps", "6", "--eval_interval", "3", "--sample_prompt", "Mia lives")
    ckpt = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["stage"] == "pretrain"
    assert ckpt["muon_opt"]["state"] and ckpt["adamw_opt"]["state"]
    assert ckpt["model_config"]["hidden_size"] == 64
    for key in ("data", "rng", "tokenizer_fingerprint", "tokenizer_path"):
        assert key in ckpt
    rows = metrics(tmp_path)
    assert {0, 3, 6} <= {s for s, row in rows.items() if "val_loss" in row}
    assert all(k in rows[6] for k in ("loss", "lr_muon", "lr_adamw", "grad_norm", "tok_per_s", "mem_gb"))
    assert "sample: " in r.stdout
    assert "Muon" in r.stdout and "AdamW" in r.stdout  # the split summary is printed


COMPILE_PROBE = """
import functools, json, os, runpy, sys, torch
sys.path.insert(0, ".")  # the project root, also when torchrun runs this as a file from elsewhere
graphs = []  # per graph dynamo compiles: its node count and how many of its inputs are symbolic sizes
def backend(gm, example_inputs):
    graphs.append([len(gm.graph.nodes), sum(not isinstance(i, torch.Tensor) for i in example_inputs)])
    return gm.forward
torch.compile = functools.partial(torch.compile, backend=backend)  # the script's own flags, a cheap backend
sys.argv = ["train_pretrain_muon.py"] + sys.argv[1:]
try:
    runpy.run_path("train_pretrain_muon.py", run_name="__main__")
finally:  # one write per process: under torchrun both ranks share the pipe, and print() may write in pieces
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("\\nGRAPHS " + json.dumps(graphs) + "\\n").encode())
"""


def compiled_graphs(stdout):
    """Each process's [[nodes, symbolic inputs], ...] printed by COMPILE_PROBE."""
    return [json.loads(line.split(maxsplit=1)[1]) for line in stdout.splitlines() if line.startswith("GRAPHS")]


def test_val_rows_report_bits_per_byte_and_training_time_without_evaluations(data_dir, tmp_path):
    from data.loaders import eval_bytes_per_token
    from data.tokenizer import load_tokenizer
    pretrain(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "2")
    rows = [json.loads(line) for line in open(tmp_path / "pretrain_metrics.jsonl")]
    vals, logged = [r for r in rows if "val_loss" in r], [r for r in rows if "elapsed_s" in r]
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    bpt = eval_bytes_per_token(os.path.join(data_dir, "val.bin"), tok.token_bytes(), 8, 64, 4)
    assert 1 < bpt < 10
    for r in vals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / np.log(2) / bpt, rel=1e-9)
    assert [r["step"] for r in vals] == [0, 2, 4] and vals[0]["train_s"] < 0.05
    # the evaluations at steps 0 and 2 happened inside the first four steps' wall time, not their training time
    assert 0 < vals[1]["train_s"] < vals[2]["train_s"] < logged[-1]["elapsed_s"]


def test_training_graph_keeps_static_shapes_after_an_eval_with_a_smaller_batch(data_dir, tmp_path):
    # A val set of 3 windows makes the step-0 eval batch 3 while training uses 8. With dynamo's
    # default automatic dynamic shapes, that second batch size compiled the training graph with a
    # symbolic batch size, slower on GPU than the graph for the fixed size pretraining always has.
    small = tmp_path / "data"
    shutil.copytree(data_dir, small)
    val = np.fromfile(small / "val.bin", dtype=np.uint16)[:3 * 64 + 1]
    val.tofile(small / "val.bin")
    meta = json.loads((small / "meta.json").read_text())
    (small / "meta.json").write_text(json.dumps(dict(meta, val_tokens=len(val))))
    cmd = [sys.executable, "-c", COMPILE_PROBE, "--data_path", str(small), "--out_dir", str(tmp_path / "out"),
           *TINY, "--max_steps", "2", "--eval_interval", "2", "--compile"]
    r = run_finished_script(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    symbolic = [n for _, n in compiled_graphs(r.stdout)[0]]
    assert len(symbolic) >= 2 and not any(symbolic), symbolic  # eval graph, training graph: sizes fixed


def test_loss_falls_on_the_embedded_data(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "40", "--eval_interval", "40")
    rows = metrics(tmp_path)
    assert rows[40]["val_loss"] < rows[0]["val_loss"] - 1.5, (rows[0]["val_loss"], rows[40]["val_loss"])


def test_adamw_baseline_trains_every_parameter_with_adamw(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "10", "--eval_interval", "10", "--optimizer", "adamw",
             "--lr_adamw", "3e-3")
    ckpt = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    assert ckpt["muon_opt"] is None
    n_params = len(ckpt["adamw_opt"]["state"])
    assert n_params == sum(len(g["params"]) for g in ckpt["adamw_opt"]["param_groups"])
    rows = metrics(tmp_path)
    assert rows[10]["val_loss"] < rows[0]["val_loss"] - 0.5


def test_two_processes_follow_the_one_process_loss_curve_at_equal_global_batch(data_dir, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    # moderate LRs: the tolerances below are for rounding, which larger steps amplify
    flags = ["--max_steps", "8", "--eval_interval", "8", "--lr_muon", "0.02", "--lr_adamw", "5e-4"]
    pretrain(data_dir, one, *flags, "--batch_size", "8")
    pretrain(data_dir, two, *flags, "--batch_size", "4", nproc=2)
    assert_follows(metrics(one), metrics(two), 8)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run_exactly(data_dir, tmp_path):
    # with every Muon option on, so NorMuon's second moments and the momentum schedule resume too
    flags = ["--max_steps", "30", "--eval_interval", "10", *ALL_OPTIONS]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    pretrain(data_dir, straight, *flags)

    cmd = [sys.executable, "train_pretrain_muon.py", "--data_path", data_dir, "--out_dir", str(broken),
           *TINY, *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(broken, "pretrain_metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # like Ctrl-C: the script saves at the next logged step and exits
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out  # "interrupted, resumable": not 0, which means finished
    stopped_at = torch.load(broken / "pretrain.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 30, out

    pretrain(data_dir, broken, *flags, "--resume")
    a, b = metrics(straight), metrics(broken)
    assert set(a) == set(b)
    for step in a:
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))


def test_muon_momentum_warms_up_and_cools_down_as_logged(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "10", "--eval_interval", "10", "--momentum_start", "0.8",
             "--momentum", "0.96", "--momentum_warmup_steps", "4", "--momentum_cooldown_steps", "4")
    rows = metrics(tmp_path)
    # the row of step s logs the momentum of the update that led to it (schedule step s-1):
    # 4 steps up from 0.8, then 0.96, then down by 0.04 a step over the last 4 updates
    logged = [round(rows[s]["momentum"], 6) for s in range(1, 11)]
    assert logged == [0.8, 0.84, 0.88, 0.92, 0.96, 0.96, 0.96, 0.92, 0.88, 0.84], logged


def test_fsdp_at_two_processes_follows_the_one_process_run_with_every_muon_option(data_dir, tmp_path):
    flags = ["--max_steps", "8", "--eval_interval", "8", "--lr_muon", "0.02", "--lr_adamw", "5e-4", *ALL_OPTIONS]
    pretrain(data_dir, tmp_path / "one", *flags, "--batch_size", "8")
    pretrain(data_dir, tmp_path / "fsdp", *flags, "--batch_size", "4", "--fsdp", nproc=2)
    # the sums run in another order, which bf16 Newton-Schulz amplifies: the same tolerances hold
    assert_follows(metrics(tmp_path / "one"), metrics(tmp_path / "fsdp"), 8)
    # the checkpoint has the one format: whole tensors, the optimizers' state in Muon's and AdamW's own form
    one, fsdp = (torch.load(tmp_path / d / "pretrain.pt", weights_only=True) for d in ("one", "fsdp"))
    assert one["model"].keys() == fsdp["model"].keys()
    for k in one["model"]:
        assert type(fsdp["model"][k]) is torch.Tensor and fsdp["model"][k].shape == one["model"][k].shape, k
    for opt in ("muon_opt", "adamw_opt"):
        for i, state in one[opt]["state"].items():
            for k, v in state.items():
                assert type(fsdp[opt]["state"][i][k]) is torch.Tensor and fsdp[opt]["state"][i][k].shape == v.shape


def test_fsdp_at_one_process_moves_the_accumulated_gradients_into_the_shards_once(tmp_path):
    # one process's shard is the whole gradient: the gradients accumulate whole over the micro-steps and are
    # reduce-scattered (copied) into the shards after the last one, in every optimizer step
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_seq_len=16, tie_word_embeddings=False)
        ref, model = GPT(cfg), GPT(cfg)
        model.load_state_dict(ref.state_dict())
        shard(model)
        for _ in range(2):
            batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
            for i in micro_steps(model, 3):
                for m in (model, ref):
                    (m(batches[i], batches[i])[1] / 3).backward()
                have = [p.grad is not None for p in model.parameters()]
                assert all(have) if i == 2 else not any(have), i
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
            model.zero_grad(), ref.zero_grad()
    finally:
        dist.destroy_process_group()


def test_fsdp_at_one_process_with_accumulation_follows_the_plain_run(data_dir, tmp_path):
    flags = ["--max_steps", "4", "--eval_interval", "4", "--batch_size", "4", "--accumulation_steps", "2"]
    pretrain(data_dir, tmp_path / "plain", *flags)
    pretrain(data_dir, tmp_path / "fsdp", *flags, "--fsdp", nproc=1, torchrun=True)
    assert_follows(metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp"), 4)


def test_a_run_moves_between_fsdp_distmuon_and_one_process_on_resume(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "4", "--batch_size", "4", "--fsdp", nproc=2)
    pretrain(data_dir, tmp_path, "--max_steps", "8", "--eval_interval", "4", "--batch_size", "8", "--resume")
    pretrain(data_dir, tmp_path, "--max_steps", "12", "--eval_interval", "4", "--batch_size", "4", "--resume", nproc=2)
    r = pretrain(data_dir, tmp_path, "--max_steps", "16", "--eval_interval", "4", "--batch_size", "4", "--fsdp",
                 "--resume", nproc=2)
    assert "saved by 2 process" in r.stdout
    rows = metrics(tmp_path)
    assert rows[16]["val_loss"] < rows[8]["val_loss"] < rows[0]["val_loss"]


def test_fsdp_compiles_each_block_on_its_own_and_samples_eagerly(data_dir, tmp_path):
    # FSDP2 gathers each block's weights in hooks around it: compiled per block (and the output on its own),
    # the blocks share their graphs, the same for any depth, and sampling (a new shape every token) adds none
    probe = tmp_path / "probe.py"
    probe.write_text(COMPILE_PROBE)
    graphs = {}
    for layers in (2, 6):
        shape = [str(layers) if TINY[i - 1] == "--num_hidden_layers" else a for i, a in enumerate(TINY)]
        r = run_finished_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe),
                                 "--data_path", data_dir, "--out_dir", str(tmp_path / str(layers)), *shape,
                                 "--max_steps", "2", "--eval_interval", "2", "--batch_size", "4", "--fsdp", "--compile",
                                 "--sample_prompt", "Mia lives"],
                                cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "sample: " in r.stdout and "recompile_limit" not in r.stderr
        graphs[layers] = [[nodes for nodes, _ in process] for process in compiled_graphs(r.stdout)]
    # each process: the first block (nothing to add yet), the other blocks and the output, each with and without grad
    for nodes in (*graphs[2], *graphs[6]):
        assert len(nodes) <= 6, graphs
    assert max(graphs[2][0]) == max(graphs[6][0]), graphs  # the largest graph is one block, at any depth


def test_pretraining_defaults_to_a_warmdown_and_an_untied_embedding_at_its_own_lr(data_dir, tmp_path):
    pretrain(data_dir, tmp_path / "untied", "--max_steps", "10", "--eval_interval", "10", "--lr_muon", "0.02",
             "--warmup_steps", "2")
    rows = metrics(tmp_path / "untied")
    # the row of step s logs the LR of update s-1: warmup, flat, then linear over the last 65% to 5%
    expected = [0.01, 0.02, 0.02, 0.02] + [0.02 * (0.05 + 0.95 * (10 - s) / 6.5) for s in range(4, 10)]
    assert [rows[s]["lr_muon"] for s in range(1, 11)] == pytest.approx(expected, rel=1e-9)
    ckpt = torch.load(tmp_path / "untied" / "pretrain.pt", weights_only=True)
    embedding, matrices, _ = ckpt["adamw_opt"]["param_groups"]
    assert ckpt["model_config"]["tie_word_embeddings"] is False and ckpt["muon_opt"]["param_groups"][0]["normuon"]
    assert embedding["lr"] == pytest.approx(0.4 / 3e-3 * matrices["lr"]) and embedding["weight_decay"] == 0.0
    # tied, the embedding is the head as well and trains as the head does
    pretrain(data_dir, tmp_path / "tied", "--max_steps", "2", "--eval_interval", "2", "--tie_word_embeddings")
    embedding, matrices, _ = torch.load(tmp_path / "tied" / "pretrain.pt", weights_only=True)["adamw_opt"]["param_groups"]
    assert (embedding["lr"], embedding["weight_decay"]) == (matrices["lr"], matrices["weight_decay"]) and matrices["lr"] > 0


def test_the_embedding_takes_its_own_lr_and_weight_decay(data_dir, tmp_path):
    flags = ["--max_steps", "2", "--eval_interval", "2", "--no-tie_word_embeddings", "--weight_decay", "0.2",
             "--lr_adamw", "1e-3", "--lr_embedding", "0.05", "--weight_decay_embedding", "0", "--warmup_steps", "0"]
    pretrain(data_dir, tmp_path, *flags)
    groups = torch.load(tmp_path / "pretrain.pt", weights_only=True)["adamw_opt"]["param_groups"]
    embedding, matrices, vectors = groups
    assert (embedding["weight_decay"], matrices["weight_decay"], vectors["weight_decay"]) == (0.0, 0.2, 0.0)
    assert embedding["lr"] == pytest.approx(50 * matrices["lr"]) and matrices["lr"] == vectors["lr"] > 0
    # kept in the optimizer's state, so a resume must not change it
    r = pretrain(data_dir, tmp_path, *flags[:-4], "--weight_decay_embedding", "0.1", "--max_steps", "4", "--resume",
                 check=False)
    assert r.returncode != 0 and "--weight_decay_embedding 0" in r.stderr and "Traceback" not in r.stderr


def test_adamw_betas_reach_every_adamw_group_and_a_resume_keeps_them(data_dir, tmp_path):
    flags = ["--max_steps", "2", "--eval_interval", "2", "--adamw_beta1", "0.8", "--adamw_beta2", "0.99"]
    pretrain(data_dir, tmp_path, *flags)
    groups = torch.load(tmp_path / "pretrain.pt", weights_only=True)["adamw_opt"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.8, 0.99)] * 3
    # kept in the optimizer's state, so a resume must not change them
    r = pretrain(data_dir, tmp_path, *flags[:4], "--adamw_beta2", "0.99", "--max_steps", "4", "--resume", check=False)
    assert r.returncode != 0 and "--adamw_beta1 0.8" in r.stderr and "Traceback" not in r.stderr
    # a beta of 1 would never forget: refused before anything runs
    r = pretrain(data_dir, tmp_path / "one", "--adamw_beta1", "1", check=False)
    assert r.returncode == 2 and "--adamw_beta1: must be a number >= 0 and < 1" in r.stderr, r.stderr


def test_activation_checkpointing_computes_the_same_run(data_dir, tmp_path):
    flags = ["--max_steps", "3", "--eval_interval", "3"]
    pretrain(data_dir, tmp_path / "plain", *flags)
    pretrain(data_dir, tmp_path / "ac", *flags, "--activation_checkpointing")
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ac")
    for step in (1, 2, 3):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"], step


def test_fsdp_without_torchrun_says_how_to_run_it(data_dir, tmp_path):
    r = pretrain(data_dir, tmp_path, "--max_steps", "2", "--fsdp", check=False)
    assert r.returncode != 0 and "torchrun --nproc_per_node" in r.stderr and "Traceback" not in r.stderr


def test_fsdp_with_fp16_stops_each_rank_naming_the_dtype_to_use(data_dir, tmp_path):
    r = pretrain(data_dir, tmp_path, "--max_steps", "2", "--fsdp", "--dtype", "float16", nproc=2, check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all("--dtype bfloat16" in e for e in errors) and not os.path.exists(tmp_path / "pretrain.pt")


def test_resume_on_a_different_number_of_processes_continues_training(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "6", "--eval_interval", "6", "--batch_size", "8")
    before = metrics(tmp_path)[6]["val_loss"]
    r = pretrain(data_dir, tmp_path, "--max_steps", "14", "--eval_interval", "7", "--batch_size", "4",
                 "--resume", nproc=2)
    assert "saved by 1 process" in r.stdout
    ckpt = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    assert ckpt["step"] == 14 and ckpt["world_size"] == 2
    assert metrics(tmp_path)[14]["val_loss"] < before


def test_a_crash_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    script = (f"import torch\nfrom common import save_checkpoint\n"
              f"save_checkpoint({path!r}, {{'step': 1, 'w': torch.ones(3)}})\nprint('saved', flush=True)\n"
              f"while True:\n    save_checkpoint({path!r}, {{'step': 2, 'w': torch.randn(30_000_000)}})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(1.0)  # well inside a 120 MB write
    proc.kill()
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] in (1, 2) and ckpt["w"].numel() in (3, 30_000_000)


def test_a_failed_checkpoint_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(SystemExit):  # one message (the write failed, the old checkpoint is intact), exit 1
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_missing_data_path_stops_with_a_clear_message(tmp_path):
    r = pretrain(str(tmp_path / "nope.jsonl"), tmp_path, "--max_steps", "2", check=False)
    assert r.returncode != 0
    assert "nope.jsonl" in r.stderr and "no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "4")
    with open(tmp_path / "pretrain.pt", "rb") as f:
        good = f.read()
    # an absurd AdamW LR blows the embedding up to inf within a step or two
    r = pretrain(data_dir, tmp_path, "--max_steps", "12", "--eval_interval", "100", "--resume",
                 "--lr_adamw", "1e38", "--warmup_steps", "0", check=False)
    assert r.returncode != 0
    assert "at step" in r.stderr and ("nan" in r.stderr or "inf" in r.stderr), r.stderr[-2000:]
    with open(tmp_path / "pretrain.pt", "rb") as f:
        assert f.read() == good


def test_wandb_offline_run_logs_both_learning_rates(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "train_pretrain_muon.py", "--data_path", data_dir, "--out_dir",
                        str(tmp_path), *TINY, "--max_steps", "3", "--eval_interval", "3", "--use_wandb"],
                       cwd=ROOT, env=script_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "wandb") for f in fs if f.endswith(".wandb")]
    assert runs, "no offline wandb run was written"
    blob = open(runs[0], "rb").read()
    assert b"lr_muon" in blob and b"lr_adamw" in blob


def test_init_from_starts_from_the_checkpoint_weights_and_refuses_another_shape(data_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    pretrain(data_dir, first, "--max_steps", "6", "--eval_interval", "6")
    # shape flags left out: the checkpoint's shape is used, and training starts where it ended
    i = TINY.index("--hidden_size")
    flags = TINY[:i] + TINY[i + 4:]  # without --hidden_size 64 --num_hidden_layers 2
    r = run_main("train_pretrain_muon.py", "--data_path", data_dir, "--out_dir", str(second), *flags,
                 "--init_from", str(first / "pretrain.pt"), "--max_steps", "2", "--eval_interval", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics(second)[0]["val_loss"] == metrics(first)[6]["val_loss"]
    bad = pretrain(data_dir, tmp_path / "third", "--init_from", str(first / "pretrain.pt"), "--hidden_size", "32",
                   "--max_steps", "2", check=False)
    assert bad.returncode != 0 and "hidden_size=64" in bad.stderr and "Traceback" not in bad.stderr


def test_no_norm_weights_is_saved_with_the_model_and_kept_by_a_continued_run(data_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    pretrain(data_dir, first, "--max_steps", "2", "--eval_interval", "2", "--no-norm_weights")
    ckpt = torch.load(first / "pretrain.pt", weights_only=False)
    assert ckpt["model_config"]["norm_weights"] is False
    assert not any("norm" in name for name in ckpt["model"])
    # without the flag, a run from that checkpoint takes its norms; with the other value it stops
    pretrain(data_dir, second, "--init_from", str(first / "pretrain.pt"), "--max_steps", "2", "--eval_interval", "2")
    assert torch.load(second / "pretrain.pt", weights_only=False)["model_config"]["norm_weights"] is False
    bad = pretrain(data_dir, tmp_path / "third", "--init_from", str(first / "pretrain.pt"), "--norm_weights",
                   "--max_steps", "2", check=False)
    assert bad.returncode != 0 and "norm_weights=False" in bad.stderr and "Traceback" not in bad.stderr


def test_rope_theta_is_saved_with_the_model_and_kept_by_a_continued_run(data_dir, tmp_path):
    base, wide, second = tmp_path / "base", tmp_path / "wide", tmp_path / "second"
    pretrain(data_dir, base, "--max_steps", "2", "--eval_interval", "2")
    pretrain(data_dir, wide, "--max_steps", "2", "--eval_interval", "2", "--rope_theta", "100000")
    assert torch.load(base / "pretrain.pt", weights_only=False)["model_config"]["rope_theta"] == 10000.0
    assert torch.load(wide / "pretrain.pt", weights_only=False)["model_config"]["rope_theta"] == 100000.0
    assert metrics(wide)[2]["val_loss"] != metrics(base)[2]["val_loss"]  # the model turns its positions by it
    # without the flag, a run from that checkpoint takes its base; with another value it stops
    pretrain(data_dir, second, "--init_from", str(wide / "pretrain.pt"), "--max_steps", "2", "--eval_interval", "2")
    assert torch.load(second / "pretrain.pt", weights_only=False)["model_config"]["rope_theta"] == 100000.0
    bad = pretrain(data_dir, tmp_path / "third", "--init_from", str(wide / "pretrain.pt"), "--rope_theta", "10000",
                   "--max_steps", "2", check=False)
    assert bad.returncode != 0 and "rope_theta=100000.0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_checkpoint_from_before_norm_weights_counts_as_having_them(capsys):
    from argparse import Namespace
    from common import check_model_matches
    old = {"model_config": {"hidden_size": 64}}  # no "norm_weights" key
    check_model_matches(old, Namespace(norm_weights=True), None, "old.pt")
    with pytest.raises(SystemExit):
        check_model_matches(old, Namespace(norm_weights=False), None, "old.pt")
    assert "old.pt has norm_weights=True but --norm_weights False" in capsys.readouterr().err


def test_lr_adamw_default_follows_the_optimizer(monkeypatch):
    # next to Muon, AdamW trains only the embedding, head and norms and wants a higher LR than alone
    import train_pretrain_muon
    for flags, expected in (([], 8e-3), (["--optimizer", "adamw"], 2e-3),
                            (["--optimizer", "adamw", "--lr_adamw", "1e-3"], 1e-3), (["--lr_adamw", "3e-3"], 3e-3)):
        monkeypatch.setattr(sys, "argv", ["train_pretrain_muon.py", *flags])
        assert train_pretrain_muon.parse_args().lr_adamw == expected, flags
