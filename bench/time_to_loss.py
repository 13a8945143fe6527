"""Wall time to a target val loss: our pretraining against nanochat's own d12 recipe on the same tokens.

Both sides train nanochat's d12 shape (768 wide, 12 layers, 6 heads of 128, sequence 2048) on one prepared
directory with the same batches (our TokenWindowLoader, one seed) and evaluate on the same val windows, so
their val losses compare number for number. nanochat runs through its anchor script
(`nanochat_time_to_loss.py`: its model, its MuonAdamW and base_train.py's schedules, unchanged), ours through
train_pretrain_muon.py, as a user runs it. Time is seconds inside training steps, torch.compile included on
both sides, evaluations left out on both. The target is nanochat's final val loss; each run's time to it
is read off its val curve (linear between evaluations).

    python bench/time_to_loss.py --data_path data/prepared/code32k --steps 190       # ~50M tokens
    python bench/time_to_loss.py --data_path ... --runs nanochat,ours,normuon --variant normuon="--normuon"
    python bench/time_to_loss.py --merge a.json b.json --name time_to_loss_150M      # runs of separate jobs

--parallel starts every run at once on the one GPU: a screen of loss against tokens whose times are not
comparable. Writes bench/results/<name>.{md,json,png}.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.muon_step import get_device_name, write_table  # noqa: E402
from data.loaders import eval_bytes_per_token  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402

ANCHOR = os.path.join(os.path.dirname(ROOT), "shared", "anchors", "nanochat_time_to_loss.py")


def run_command(label, cmd, log_path, env=None):
    """Start cmd, copy its output to log_path and print its val rows with the label in front."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def pump():
        for line in proc.stdout:
            log.write(line)
            if "val loss" in line or "val_loss" in line or "error" in line.lower():
                print(f"[{label}] {line.rstrip()}", flush=True)
        log.close()
    thread = threading.Thread(target=pump)
    thread.start()
    return proc, thread


def shape_flags(depth):
    """nanochat's shape for a depth: 64 * depth wide, heads of 128 (d12: 768 wide, 6 heads)."""
    hidden = 64 * depth
    heads = str(max(1, hidden // 128))
    return ["--hidden_size", str(hidden), "--num_hidden_layers", str(depth), "--num_attention_heads", heads,
            "--num_key_value_heads", heads]


def ours_command(args, flags, out_dir):
    return [sys.executable, "train_pretrain_muon.py", "--data_path", args.data_path, *shape_flags(args.depth),
            "--max_seq_len", str(args.seq_len), "--batch_size", str(args.batch_size),
            "--accumulation_steps", str(args.accumulation_steps), "--max_steps", str(args.steps),
            "--eval_interval", str(args.eval_interval), "--eval_iters", str(args.eval_iters), "--seed", str(args.seed),
            "--log_interval", str(args.eval_interval), "--save_interval", "0", "--sample_prompt", "",
            "--out_dir", out_dir, *flags.split()]


def nanochat_command(args):
    return [sys.executable, args.anchor, args.data_path, "--steps", str(args.steps),
            "--batch_size", str(args.batch_size), "--accumulation_steps", str(args.accumulation_steps),
            "--seq_len", str(args.seq_len), "--eval_interval", str(args.eval_interval),
            "--eval_iters", str(args.eval_iters), "--seed", str(args.seed), "--depth", str(args.depth)]


def read_run(label, run_dir):
    """{curve: [{step, tokens, train_s, val_loss}], tok_per_s} of a finished run, or None."""
    if label == "nanochat":
        path = os.path.join(run_dir, "nanochat_ttl.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            rows = json.load(f)["rows"]
    else:
        path = os.path.join(run_dir, "pretrain_metrics.jsonl")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            logged = [json.loads(line) for line in f]
        rows = [{k: r[k] for k in ("step", "tokens", "train_s", "val_loss")} for r in logged if "val_loss" in r]
    # tokens/s between evaluations after the first interval (which holds torch.compile)
    steady = [(b["tokens"] - a["tokens"]) / (b["train_s"] - a["train_s"]) for a, b in zip(rows[1:], rows[2:])
              if b["train_s"] > a["train_s"]]
    return {"curve": rows, "tok_per_s": round(statistics.median(steady)) if steady else None}


def time_to(curve, target, key):
    """`key` (train_s or tokens) at which the val curve first reaches target, linear between
    evaluations; None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= target:
            f = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"]) if a["val_loss"] > target else 0.0
            return a[key] + f * (b[key] - a[key])
    return None


def summarise(runs, first, bytes_per_token, parallel):
    """One table row per run: final loss in nats and bits per byte, time and tokens to the target (the
    first run's final loss), and both as ratios of the first run's whole run."""
    base = runs[first]
    target = base["curve"][-1]["val_loss"]
    rows = []
    for label, run in runs.items():
        final = run["curve"][-1]
        t, n = time_to(run["curve"], target, "train_s"), time_to(run["curve"], target, "tokens")
        row = {"run": label, "tokens_M": round(final["tokens"] / 1e6, 1), "val_loss": round(final["val_loss"], 4),
               "val_bpb": round(final["val_loss"] / math.log(2) / bytes_per_token, 4),
               "train_s": round(final["train_s"], 1), "tok_per_s": run["tok_per_s"],
               "tokens_to_target_M": n and round(n / 1e6, 1), "s_to_target": t and round(t, 1),
               "time_ratio": t and round(t / base["curve"][-1]["train_s"], 3),
               "token_ratio": n and round(n / base["curve"][-1]["tokens"], 3)}
        if parallel:
            row.update(train_s=None, tok_per_s=None, s_to_target=None, time_ratio=None)
        rows.append(row)
    return rows


def plot(path, runs, target, bytes_per_token, parallel):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    axes = plt.subplots(1, 1 if parallel else 2, figsize=(6 if parallel else 12, 4.5), squeeze=False)[1][0]
    for label, run in runs.items():
        c = run["curve"][1:]  # step 0's loss (~ln vocab) would squash the rest
        axes[0].plot([r["tokens"] / 1e6 for r in c], [r["val_loss"] for r in c], label=label)
        if not parallel:
            axes[1].plot([r["train_s"] for r in c], [r["val_loss"] for r in c], label=label)
    for ax, x in zip(axes, ("tokens (M)", "training seconds (compile included)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(x)
        ax.set_ylabel(f"val loss (nats; bpb = nats / {math.log(2) * bytes_per_token:.3f})")
        ax.legend()
        ax.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", help="a prepared directory (data/prepare.py)")
    ap.add_argument("--runs", default="nanochat,ours", help="comma separated: nanochat and/or variant labels")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                    help="our run LABEL with these train_pretrain_muon.py flags (ours: the defaults)")
    ap.add_argument("--steps", type=int, default=190, help="optimizer steps of every run")
    ap.add_argument("--depth", type=int, default=12, help="layers; 64 * depth wide, heads of 128 (nanochat's d12)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--accumulation_steps", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--eval_interval", type=int, default=10)
    ap.add_argument("--eval_iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--parallel", action="store_true", help="all runs at once: loss against tokens only")
    ap.add_argument("--anchor", default=ANCHOR, help="nanochat_time_to_loss.py")
    ap.add_argument("--merge", nargs="*", default=None, help="combine the runs of these result json files")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "time_to_loss"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default="time_to_loss")
    args = ap.parse_args()

    if args.merge:
        runs, metas = {}, []
        for path in args.merge:
            with open(path) as f:
                doc = json.load(f)
            runs.update(doc["runs"])
            metas.append(doc["meta"])
        meta = {**metas[0], "merged": ", ".join(f"{m['date']} {m['device']}" for m in metas),
                "command": " ".join(["python"] + sys.argv), "runs_by": [m["command"] for m in metas],
                "flags": {k: v for m in metas for k, v in m.get("flags", {}).items()},
                "parallel": any(m.get("parallel") for m in metas)}
        report(args, meta, runs)
        return
    variants = {"ours": ""}
    for v in args.variant:
        label, _, flags = v.partition("=")
        variants[label] = flags
    labels = args.runs.split(",")
    unknown = [label for label in labels if label != "nanochat" and label not in variants]
    if unknown:
        ap.error(f"no --variant for {unknown}")
    if "nanochat" in labels and not os.path.isfile(args.anchor):
        ap.error(f"--anchor {args.anchor}: no such file; give the path of nanochat_time_to_loss.py or leave "
                 "nanochat out of --runs")
    tok = load_tokenizer(os.path.join(args.data_path, "tokenizer.json"))
    with open(os.path.join(args.data_path, "meta.json")) as f:
        data_meta = json.load(f)
    tokens_per_step = args.batch_size * args.seq_len * args.accumulation_steps
    meta = {"device": get_device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "data": f"{args.data_path}: {data_meta['train_tokens']:,} train / {data_meta['val_tokens']:,} val "
                    f"tokens, vocab {data_meta['vocab_size']}",
            "model": f"d{args.depth}: {' '.join(shape_flags(args.depth))} --max_seq_len {args.seq_len}",
            "batch": f"{tokens_per_step:,} tokens per step ({args.batch_size} x {args.seq_len} x "
                     f"{args.accumulation_steps}), {args.steps} steps = {args.steps * tokens_per_step / 1e6:.1f}M "
                     f"tokens, seed {args.seed}",
            "eval": f"every {args.eval_interval} steps, {args.eval_iters} batches of the val file's first windows",
            "bytes_per_token": eval_bytes_per_token(os.path.join(args.data_path, "val.bin"), tok.token_bytes(),
                                                    args.batch_size, args.seq_len, args.eval_iters),
            "parallel": args.parallel, "flags": {label: variants.get(label) for label in labels}}
    runs, started = {}, []
    for label in labels:
        run_dir = os.path.join(os.path.abspath(args.work_dir), label)
        os.makedirs(run_dir, exist_ok=True)
        for stale in ("nanochat_ttl.json", "pretrain_metrics.jsonl", "pretrain.pt"):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        cmd = nanochat_command(args) if label == "nanochat" else ours_command(args, variants[label], run_dir)
        print(f"[{label}] {' '.join(cmd)}", flush=True)
        proc, thread = run_command(label, cmd, os.path.join(run_dir, "train.log"), {"OUT": run_dir})
        started.append((label, run_dir, proc, thread, time.time()))
        if not args.parallel:  # one after another: the table so far after each run
            finish(started[-1], variants, runs)
            report(args, meta, runs)
    if args.parallel:
        for run in started:
            finish(run, variants, runs)
        report(args, meta, runs)


def finish(started, variants, runs):
    """Wait for a started run and add its curve to runs (a failed run is reported and left out)."""
    label, run_dir, proc, thread, t0 = started
    proc.wait()
    thread.join()
    print(f"[{label}] exit {proc.returncode} after {time.time() - t0:.0f}s", flush=True)
    run = read_run(label, run_dir)
    if proc.returncode != 0 or run is None:
        print(f"[{label}] failed; log: {run_dir}/train.log", flush=True)
        return
    runs[label] = {**run, "flags": variants.get(label)}
    ckpt = os.path.join(run_dir, "pretrain.pt")
    if os.path.exists(ckpt):
        os.remove(ckpt)


def report(args, meta, runs):
    """The table, the json (with every curve) and the plot of the runs so far."""
    if not runs:
        return
    first = "nanochat" if "nanochat" in runs else next(iter(runs))
    target = runs[first]["curve"][-1]["val_loss"]
    meta = {**meta, "target": f"val loss {target} ({first}'s final)",
            "columns": "train_s: seconds inside training steps, torch.compile included, evaluations left out; "
                       f"time_ratio / token_ratio: a run's time / tokens to the target over {first}'s whole run"
                       + ("; all runs at once on one GPU, so no time is comparable (left out)" if meta["parallel"]
                          else "")}
    write_table(args.out_dir, args.name, meta, summarise(runs, first, meta["bytes_per_token"], meta["parallel"]))
    with open(os.path.join(args.out_dir, args.name + ".json")) as f:
        doc = json.load(f)
    doc["runs"] = runs
    with open(os.path.join(args.out_dir, args.name + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(os.path.join(args.out_dir, args.name + ".png"), runs, target, meta["bytes_per_token"], meta["parallel"])


if __name__ == "__main__":
    main()
