"""Does each state-of-the-art Muon option pay off? Plain Muon vs each option alone vs all together
vs AdamW: same model, data order, tokens and seed (the setup of bench/compare_optimizers.py).

    python bench/muon_options.py                                   # CPU: embedded corpus
    python bench/muon_options.py --scale gpu --data_path data/prepared/NAME --lr_muon 0.04 --lr_adamw 1e-3

Every Muon run uses the same --lr_muon and --lr_adamw (take the best ones from compare_optimizers);
the options are not re-tuned. Cautious weight decay only acts with weight decay, so it is compared
with plain Muon at the same --weight_decay ("plain_wd"). Reports final val loss, and the tokens each
run needs to reach plain Muon's final val loss (efficiency = plain's tokens / the run's).
Writes bench/results/muon_options_<scale>[_<data>].{md,json,png}.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.compare_optimizers import SCALES, data_label, evals, plot, run, tokens_to_reach  # noqa: E402
from bench.muon_step import write_table  # noqa: E402


def variants(args):
    """name -> extra flags of the pretraining script."""
    wd = ["--weight_decay", str(args.weight_decay)]
    momentum = ["--momentum_start", "0.85", "--momentum_warmup_steps", str(args.momentum_warmup_steps),
                "--momentum_cooldown_steps", str(args.momentum_cooldown_steps)]
    return {
        "plain": [],
        "polar_express": ["--ns_coefficients", "polar_express"],
        "normuon": ["--normuon"],
        "momentum_schedule": momentum,
        "plain_wd": wd,
        "cautious_wd": wd + ["--cautious_wd"],
        "all": ["--ns_coefficients", "polar_express", "--normuon", "--cautious_wd", *wd, *momentum],
        "adamw": ["--optimizer", "adamw"],
    }


def run_once(out_dir, flags):
    """run(), or the result a finished run with the same flags left in out_dir/result.json (so an
    interrupted benchmark starts again where it stopped); the checkpoint is not kept."""
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved["flags"] == flags:
            print(f"  {os.path.basename(out_dir)}: reused {done}")
            return saved["rows"], saved["wall"]
    rows, wall = run("train_pretrain_muon.py", out_dir, flags, print)
    with open(done, "w") as f:
        json.dump({"flags": flags, "rows": rows, "wall": wall}, f)
    if os.path.exists(os.path.join(out_dir, "pretrain.pt")):
        os.remove(os.path.join(out_dir, "pretrain.pt"))
    return rows, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--data_path", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr_muon", type=float, default=0.01, help="every Muon run's LR (CPU best of compare_optimizers)")
    ap.add_argument("--lr_adamw", type=float, default=2e-3, help="AdamW's LR, for the baseline and Muon's non-matrices")
    ap.add_argument("--weight_decay", type=float, default=0.1, help="of plain_wd, cautious_wd and all")
    ap.add_argument("--momentum_warmup_steps", type=int, default=100)
    ap.add_argument("--momentum_cooldown_steps", type=int, default=50)
    ap.add_argument("--only", default=None, help="comma-separated subset of the variants")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "bench_options"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--seed 1'")
    args = ap.parse_args()

    spec = SCALES[args.scale]
    steps = args.steps or spec["steps"]
    # plain Muon: no weight decay and a constant momentum (pretraining's defaults have both); each variant
    # adds its flags after these
    common = ["--max_steps", str(steps), "--eval_interval", str(spec["eval_interval"]), "--log_interval", "25",
              "--sample_prompt", "", "--lr_muon", str(args.lr_muon), "--lr_adamw", str(args.lr_adamw), *spec["model"],
              "--weight_decay", "0", "--momentum_warmup_steps", "0", "--momentum_cooldown_steps", "0"]
    if args.data_path:
        common += ["--data_path", args.data_path]
    common += args.extra.split()
    todo = variants(args)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",") or k == "plain"}
    os.makedirs(args.work_dir, exist_ok=True)
    print(f"{len(todo)} runs of {steps} steps, {args.scale}", flush=True)
    results = {name: run_once(os.path.join(args.work_dir, f"{args.scale}_{name}"), common + flags)
               for name, flags in todo.items()}

    curves = {name: evals(rows) for name, (rows, _) in results.items()}
    target = curves["plain"][-1][1]
    plain_reach = tokens_to_reach(curves["plain"], target)
    rows = []
    for name, (metrics, wall) in results.items():
        reach = tokens_to_reach(curves[name], target)
        muon_ms = [r["muon_ms"] for r in metrics if r.get("muon_ms")]
        rows.append({"variant": name, "flags": " ".join(todo[name]) or "(defaults)",
                     "final_val_loss": round(curves[name][-1][1], 4),
                     "vs_plain": round(curves[name][-1][1] - target, 4),
                     "tokens_to_plain_final": round(reach) if reach else None,
                     "efficiency_vs_plain": round(plain_reach / reach, 2) if reach else None,
                     "muon_ms": round(sorted(muon_ms)[len(muon_ms) // 2], 2) if muon_ms else None,
                     "wall_s": round(wall, 1)})

    import torch
    # the default data keeps the plain name; other data adds its directory's name
    name = f"muon_options_{args.scale}" + (f"_{data_label(args.data_path)}" if args.data_path else "")
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python"] + sys.argv), "steps": steps, "lr_muon": args.lr_muon,
            "lr_adamw": args.lr_adamw, "tokens": curves["plain"][-1][0]}
    write_table(args.out_dir, name, meta, rows)
    with open(os.path.join(args.out_dir, name + "_curves.json"), "w") as f:
        json.dump(curves, f)
    plot(curves, {k: k for k in curves}, os.path.join(args.out_dir, name + ".png"), f"Muon options ({args.scale})")


if __name__ == "__main__":
    main()
