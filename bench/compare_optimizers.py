"""Muon vs AdamW, side by side: same model, data order, tokens and seed; each optimizer at its best
learning rate from a small sweep that is part of the benchmark.

    python bench/compare_optimizers.py                          # CPU: embedded corpus, a few minutes a run
    python bench/compare_optimizers.py --stage sft --init_from out/pretrain.pt
    python bench/compare_optimizers.py --scale gpu --data_path data/prepared/mytext   # ~124M model

For pretraining it reports the final val loss at equal tokens, the tokens each optimizer needs to
reach AdamW's final val loss (token efficiency = AdamW's tokens / Muon's), and wall time; for SFT
the val loss and answer accuracy after the same budget. Writes bench/results/compare_<stage>_<scale>
.{md,json} and a .png of val loss vs tokens (if matplotlib is installed).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.muon_step import write_table  # noqa: E402

# Model and run sizes per scale. The sweeps are small on purpose: 3-4 LRs per optimizer.
SCALES = {
    "cpu": dict(model=["--hidden_size", "256", "--num_hidden_layers", "4", "--num_attention_heads", "4",
                       "--num_key_value_heads", "2", "--max_seq_len", "256", "--batch_size", "16"],
                steps=300, eval_interval=25,
                muon_lrs=[0.01, 0.02, 0.04, 0.08], adamw_lrs=[1e-3, 2e-3, 4e-3, 8e-3]),
    "gpu": dict(model=["--hidden_size", "768", "--num_hidden_layers", "12", "--num_attention_heads", "12",
                       "--num_key_value_heads", "12", "--max_seq_len", "1024", "--batch_size", "32"],
                steps=300, eval_interval=50,
                muon_lrs=[0.01, 0.02, 0.04], adamw_lrs=[1e-3, 2e-3, 4e-3]),
}
SFT = dict(steps=400, eval_interval=100, muon_lrs=[0.005, 0.01, 0.02], adamw_lrs=[3e-4, 1e-3, 3e-3])


def run(script, out_dir, flags, log):
    """One training run; returns (metrics rows, wall seconds)."""
    cmd = [sys.executable, script, "--out_dir", out_dir, *flags]
    t0 = time.time()
    with open(os.path.join(out_dir + ".log"), "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"run failed ({out_dir}.log): {' '.join(cmd)}")
    stage = os.path.basename(script).split("_")[1]  # pretrain / full / dpo
    name = {"pretrain": "pretrain", "full": "sft", "dpo": "dpo"}[stage]
    with open(os.path.join(out_dir, f"{name}_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    log(f"  {os.path.basename(out_dir)}: final val loss {evals(rows)[-1][1]:.4f}, {wall:.0f}s")
    return rows, wall


def evals(rows):
    """[(tokens or step, val_loss)] in order."""
    return [(r.get("tokens", r["step"]), r["val_loss"]) for r in rows if "val_loss" in r]


def tokens_to_reach(curve, target):
    """First x where the (linearly interpolated) val loss reaches target; None if never."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 <= target:
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--data_path", default=None, help="passed to the stage script (default: embedded corpus)")
    ap.add_argument("--init_from", default=None, help="SFT only: the pretrained checkpoint both start from")
    ap.add_argument("--steps", type=int, default=None, help="override the scale's steps per run")
    ap.add_argument("--muon_lrs", default=None, help="comma-separated lr_muon sweep")
    ap.add_argument("--adamw_lrs", default=None, help="comma-separated lr_adamw sweep (AdamW baseline)")
    ap.add_argument("--lr_adamw_for_muon", type=float, default=None,
                    help="AdamW LR of the non-matrix parameters in Muon runs (default: the best AdamW LR)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "bench_compare"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--seed 1'")
    args = ap.parse_args()

    spec = dict(SCALES[args.scale]) if args.stage == "pretrain" else {**SCALES[args.scale], **SFT}
    steps = args.steps or spec["steps"]
    muon_lrs = [float(x) for x in args.muon_lrs.split(",")] if args.muon_lrs else spec["muon_lrs"]
    adamw_lrs = [float(x) for x in args.adamw_lrs.split(",")] if args.adamw_lrs else spec["adamw_lrs"]
    script = "train_pretrain_muon.py" if args.stage == "pretrain" else "train_full_sft_muon.py"
    common = ["--max_steps", str(steps), "--eval_interval", str(spec["eval_interval"]), "--log_interval", "25"]
    if args.stage == "pretrain":
        common += spec["model"] + ["--sample_prompt", ""]
    if args.data_path:
        common += ["--data_path", args.data_path]
    if args.init_from:
        common += ["--init_from", args.init_from]
    common += args.extra.split()
    os.makedirs(args.work_dir, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    # 1. the sweep: every run sees the same data in the same order (same seed) for the same steps.
    # AdamW first: Muon runs then give their non-matrix parameters (embedding, head, norms) the
    # baseline's best AdamW LR, so the comparison differs only in how the matrices are trained.
    runs = {"muon": {}, "adamw": {}}
    log(f"sweep: {steps} steps per run, {args.stage}, {args.scale}")
    for lr in adamw_lrs:
        flags = ["--optimizer", "adamw", "--lr_adamw", str(lr)]
        runs["adamw"][lr] = run(script, os.path.join(args.work_dir, f"{args.stage}_adamw_{lr}"), common + flags, log)
    best_adamw = min(runs["adamw"], key=lambda lr: evals(runs["adamw"][lr][0])[-1][1])
    lr_adamw_for_muon = args.lr_adamw_for_muon or best_adamw
    for lr in muon_lrs:
        flags = ["--optimizer", "muon", "--lr_muon", str(lr), "--lr_adamw", str(lr_adamw_for_muon)]
        runs["muon"][lr] = run(script, os.path.join(args.work_dir, f"{args.stage}_muon_{lr}"), common + flags, log)

    # 2. each optimizer at its best LR (lowest final val loss)
    best = {opt: min(r, key=lambda lr: evals(r[lr][0])[-1][1]) for opt, r in runs.items()}
    curves = {opt: evals(runs[opt][best[opt]][0]) for opt in runs}
    target = curves["adamw"][-1][1]
    rows = []
    for opt in ("muon", "adamw"):
        rows_, wall = runs[opt][best[opt]]
        reach = tokens_to_reach(curves[opt], target)
        row = {"optimizer": opt, "best_lr": best[opt],
               "lr_adamw": lr_adamw_for_muon if opt == "muon" else best[opt], "final_val_loss": round(curves[opt][-1][1], 4),
               "tokens": curves[opt][-1][0], "tokens_to_adamw_final": round(reach) if reach else None,
               "wall_s": round(wall, 1)}
        acc = [r["answer_acc"] for r in rows_ if "answer_acc" in r]
        if acc:
            row["answer_accuracy"] = acc[-1]
        rows.append(row)
    muon_reach, adamw_reach = rows[0]["tokens_to_adamw_final"], rows[1]["tokens_to_adamw_final"]
    efficiency = round(adamw_reach / muon_reach, 2) if muon_reach else None
    for r in rows:
        r["token_efficiency_vs_adamw"] = efficiency if r["optimizer"] == "muon" else 1.0
    sweep = {opt: {lr: round(evals(r[0])[-1][1], 4) for lr, r in runs[opt].items()} for opt in runs}
    log(f"sweep final val losses: {json.dumps(sweep)}")

    import torch
    name = f"compare_{args.stage}_{args.scale}"
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python"] + sys.argv), "steps": steps, "sweep": json.dumps(sweep)}
    write_table(args.out_dir, name, meta, rows)
    plot(curves, {opt: f"{opt} (lr {best[opt]})" for opt in curves}, os.path.join(args.out_dir, name + ".png"),
         f"Muon vs AdamW: {args.stage} ({args.scale})")


def plot(curves, labels, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for opt, curve in curves.items():
        xs, ys = zip(*curve[1:])  # the step-0 loss dwarfs the rest
        ax.plot(xs, ys, marker="o", ms=3, label=labels[opt])
    ax.set_xlabel("tokens" if next(iter(curves.values()))[-1][0] > 10_000 else "step")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
