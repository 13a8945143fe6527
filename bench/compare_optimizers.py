"""Muon vs AdamW on the same model, data and token budget, each optimizer at its best learning rates.

    python data/prepare.py --pretrain_path BOOKS_DIR --vocab_size 16384 --out_dir data/prepared/english
    python bench/compare_optimizers.py --data_path data/prepared/english --jobs 8   # CPU-demo shape
    python bench/compare_optimizers.py --scale gpu --data_path data/prepared/english --jobs 6
    python bench/compare_optimizers.py --stage sft --init_from out/pretrain.pt
    python bench/compare_optimizers.py --jobs 8 --extra=--no-compile      # flags for every run: note the "="

Stage 1 sweeps, at seed 0, Muon's two learning rates as a grid (lr_muon for the block matrices x
lr_adamw for its AdamW part: embedding, head, norms) and AdamW's single one. Stage 2 reruns each
optimizer's best config at seeds 1..n-1 (the seed sets the initialisation and the data order).
Reports final val loss over seeds (mean, min-max, sample std) and token efficiency: the tokens
AdamW's mean curve needs to reach its final val loss / the tokens Muon's mean curve needs to reach
it. An optimum on the edge of its grid is flagged: the grid should be widened there.
Writes bench/results/compare_<stage>_<scale>_<data>.{md,json} and a .png if matplotlib is installed.
"""
import argparse
import json
import math
import os
import queue
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Model and run sizes per scale. Each grid doubles its LR from point to point; with 2 optimizers x 2
# seed reruns that is 33 training runs at the CPU shape and 25 at the GPU one. Muon's lr_adamw grid
# (embedding, head and norms only) reaches higher than AdamW's, which sets the LR of the block
# matrices too; the smaller the model, the higher Muon's best lr_adamw (bench/LOG.md).
SCALES = {
    "cpu": dict(model=["--hidden_size", "256", "--num_hidden_layers", "4", "--num_attention_heads", "4",
                       "--num_key_value_heads", "2", "--max_seq_len", "256", "--batch_size", "16"],
                steps=300, eval_interval=25,
                muon_lrs=[0.01, 0.02, 0.04, 0.08], muon_adamw_lrs=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2],
                adamw_lrs=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
    # GPT-2-small width and depth with 128-wide heads; 8 x 1024 tokens per step
    "gpu": dict(model=["--hidden_size", "768", "--num_hidden_layers", "12", "--num_attention_heads", "6",
                       "--num_key_value_heads", "6", "--max_seq_len", "1024", "--batch_size", "8"],
                steps=300, eval_interval=25,
                muon_lrs=[0.01, 0.02, 0.04, 0.08], muon_adamw_lrs=[1e-3, 2e-3, 4e-3, 8e-3],
                adamw_lrs=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]),
}
SFT = dict(steps=400, eval_interval=100, muon_lrs=[0.005, 0.01, 0.02], muon_adamw_lrs=[3e-4, 1e-3],
           adamw_lrs=[3e-4, 1e-3, 3e-3])
SCRIPTS = {"pretrain": "train_pretrain_muon.py", "sft": "train_full_sft_muon.py"}
# set by the benchmark itself for every run; --extra must not change them
RESERVED = {"--seed", "--optimizer", "--lr_muon", "--lr_adamw", "--max_steps", "--out_dir", "--resume",
            "--data_path", "--init_from"}


# ----------------------------------------------------------------------------- one training run

def train(script, out_dir, flags, env=None):
    """One training run in a subprocess, its output in <out_dir>/run.log; the checkpoint is removed
    (the metrics are all the benchmark reads). Returns {status, rows, wall, log}."""
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "run.log")
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, script, "--out_dir", out_dir, *flags], cwd=ROOT, env=env,
                           stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    stage = {"train_pretrain_muon.py": "pretrain", "train_full_sft_muon.py": "sft"}[os.path.basename(script)]
    for name in os.listdir(out_dir):
        if name.endswith(".pt"):
            os.remove(os.path.join(out_dir, name))
    if r.returncode != 0:
        return {"status": failure(log), "rows": [], "wall": wall, "log": log}
    with open(os.path.join(out_dir, f"{stage}_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"status": "ok", "rows": rows, "wall": wall, "log": log}


def failure(log):
    """'diverged' when the run stopped on a NaN/inf loss (a too-high LR: a result of the sweep), else
    'failed: <last line>' (a broken setup)."""
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    if any(re.search(r"^error: .*loss is -?(nan|inf)\b", line) for line in lines):
        return "diverged"
    return f"failed: {lines[-1] if lines else 'no output'}"


def run(script, out_dir, flags, log):
    """One run that must succeed; returns (metrics rows, wall seconds)."""
    r = train(script, out_dir, flags)
    if r["status"] != "ok":
        sys.exit(f"run {r['status']} ({r['log']}): {script} {' '.join(flags)}")
    log(f"  {os.path.basename(out_dir)}: final val loss {evals(r['rows'])[-1][1]:.4f}, {r['wall']:.0f}s")
    return r["rows"], r["wall"]


def evals(rows):
    """[(tokens or step, val_loss)] in order."""
    return [(r.get("tokens", r["step"]), r["val_loss"]) for r in rows if "val_loss" in r]


# ---------------------------------------------------------------------------- parallel runs

def visible_gpus():
    """The GPU ids a child process can be given in CUDA_VISIBLE_DEVICES ([] without CUDA)."""
    import torch
    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def gpu_slots(jobs, gpus):
    """One GPU per concurrent job, round-robin, so each GPU runs jobs/len(gpus) of them at a time."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(jobs)]


def run_parallel(script, tasks, jobs, log):
    """tasks: [(out_dir, flags)] -> results in the same order, at most `jobs` at a time. Each job takes
    a GPU slot while it runs and its share of the CPU cores (threads and inductor's compile workers)."""
    slots = queue.Queue()
    for gpu in gpu_slots(jobs, visible_gpus()):
        slots.put(gpu)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(task):
        out_dir, flags = task
        gpu = slots.get()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if jobs > 1:  # one job alone keeps torch's own thread defaults
            env.setdefault("OMP_NUM_THREADS", threads)
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", threads)
        try:
            r = train(script, out_dir, flags, env)
        finally:
            slots.put(gpu)
        loss = f"final val loss {evals(r['rows'])[-1][1]:.4f}" if r["status"] == "ok" else r["status"]
        log(f"  {os.path.basename(out_dir)}: {loss}, {r['wall']:.0f}s" + ("" if gpu is None else f" (GPU {gpu})"),
            flush=True)
        return r

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, tasks))


# ------------------------------------------------------------------------------ the statistics

def final_loss(result):
    """A run's final val loss; None for a failed or diverged run."""
    if result["status"] != "ok":
        return None
    loss = evals(result["rows"])[-1][1]
    return loss if math.isfinite(loss) else None


def best_config(losses):
    """The key with the lowest loss among {config: loss or None}; None if every run failed."""
    done = {k: v for k, v in losses.items() if v is not None}
    return min(done, key=done.get) if done else None


def edge_flags(best, grids):
    """Names of the swept axes (more than one value) whose best value is the grid's smallest or
    largest: the true optimum may lie outside the grid."""
    return [name for name, grid in grids.items()
            if len(grid) > 1 and best[name] in (min(grid), max(grid))]


def spread(values):
    """Mean, min, max and sample standard deviation (None for a single value)."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def mean_curve(curves):
    """Per-eval mean, min and max over seeds: [(x, mean, min, max)]. Every seed evaluates at the
    same steps, so the curves line up point by point."""
    xs = [x for x, _ in curves[0]]
    if any([x for x, _ in c] != xs for c in curves):
        raise ValueError("curves were evaluated at different points")
    columns = zip(*[[y for _, y in c] for c in curves])
    return [(x, statistics.fmean(ys), min(ys), max(ys)) for x, ys in zip(xs, columns)]


def tokens_to_reach(curve, target):
    """First x where the (linearly interpolated) val loss reaches target; None if never."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 <= target:
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def token_efficiency(muon_curve, adamw_curve):
    """(tokens Muon needs to reach AdamW's final val loss, AdamW's tokens to it / Muon's); the
    efficiency is None when Muon never gets there within the run."""
    target = adamw_curve[-1][1]
    muon, adamw = tokens_to_reach(muon_curve, target), tokens_to_reach(adamw_curve, target)
    return muon, (adamw / muon if muon else None)


def steps_within_one_epoch(train_tokens, tokens_per_step, cap):
    """The most steps, up to cap, whose tokens fit in one pass over the training data: a second
    pass would measure memorisation, not learning."""
    return max(1, min(cap, train_tokens // tokens_per_step))


# --------------------------------------------------------------------------------- the benchmark

def parse_lrs(text, default):
    return [float(x) for x in text.split(",")] if text else list(default)


def check_extra(extra):
    clash = sorted(RESERVED & {f.split("=")[0] for f in extra})
    if clash:
        sys.exit(f"--extra may not set {', '.join(clash)}: the benchmark sets it for each run "
                 f"(use --steps, --data_path, --init_from, or the LR grid flags)")


def tokens_per_step(flags):
    """Tokens per optimizer step of one process with these pretraining flags (the last value of a
    repeated flag wins, as in the training script)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--accumulation_steps", type=int, default=1)
    a, _ = p.parse_known_args(flags)
    return a.batch_size * a.max_seq_len * a.accumulation_steps


def prepared_data(stage, data_path):
    """The data directory every run reads, prepared here once so parallel runs never race to prepare it;
    SFT takes its --data_path as given (a prepared directory or a jsonl file)."""
    from data.cache import ensure_prepared
    if data_path is None:
        return ensure_prepared(os.path.join(ROOT, "data", "embedded"))
    if stage == "sft":
        return data_path
    from data.readers import DataError
    from train_pretrain_muon import resolve_data
    try:
        return resolve_data(data_path, 0, 1)
    except DataError as e:
        sys.exit(str(e))


def data_info(data_dir):
    """meta.json of a prepared directory ({} for a plain file)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def data_label(data_path):
    """What results are named after: a directory's name, a raw file's stem (books.txt: books), or for
    a prepared SFT file (data/prepared/english_tasks/sft_train.jsonl) its folder's."""
    path = os.path.abspath(data_path).rstrip("/")
    if not os.path.isfile(path):
        return os.path.basename(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)) if stem == "sft_train" else stem


def describe_data(name, info):
    if not info:
        return name
    return (f"{name}: {info.get('train_tokens', 0):,} train / {info.get('val_tokens', 0):,} val tokens, "
            f"vocab {info.get('vocab_size')}")


def train_tokens(data_dir):
    import numpy as np
    itemsize = np.dtype(data_info(data_dir).get("dtype", "uint16")).itemsize
    return os.path.getsize(os.path.join(data_dir, "train.bin")) // itemsize


def config_flags(config):
    opt, lr_muon, lr_adamw = config
    return ["--optimizer", opt, "--lr_adamw", str(lr_adamw)] + (["--lr_muon", str(lr_muon)] if lr_muon else [])


def config_name(config, seed):
    opt, lr_muon, lr_adamw = config
    return f"{opt}" + (f"_m{lr_muon:g}" if lr_muon else "") + f"_a{lr_adamw:g}_s{seed}"


def portable_command(args, ap):
    """The command as a user would paste it: flags that differ from their defaults, data paths
    relative to the repository (a path outside it is named as if prepared under data/prepared/)."""
    words = ["python", "bench/compare_optimizers.py"]
    for key, value in vars(args).items():
        if key in ("work_dir", "out_dir") or value == ap.get_default(key) or value is None:
            continue
        if key in ("data_path", "init_from"):
            value = portable_path(value, "data/prepared" if key == "data_path" else "out")
        # --extra=VALUE: a value that starts with "-" would otherwise read as a flag of its own
        words += [f"--{key}={shlex.quote(str(value))}"] if key == "extra" else [f"--{key}", shlex.quote(str(value))]
    return " ".join(words)


def portable_path(path, home):
    path = os.path.abspath(path)
    if path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    return f"{home}/{os.path.basename(path.rstrip('/'))}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(SCRIPTS), default="pretrain")
    ap.add_argument("--scale", choices=list(SCALES), default="cpu", help="pretraining model shape and grids")
    ap.add_argument("--data_path", default=None, help="a prepared data directory (default: embedded corpus)")
    ap.add_argument("--init_from", default=None, help="SFT only: the pretrained checkpoint both start from")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default: the scale's, capped at one epoch of the training tokens)")
    ap.add_argument("--seeds", type=int, default=3, help="seed 0 sweeps; the best configs rerun at 1..n-1")
    ap.add_argument("--jobs", type=int, default=None,
                    help="training runs at once, round-robin over the GPUs (default: one per GPU; 1 on CPU)")
    ap.add_argument("--muon_lrs", default=None, help="comma-separated lr_muon grid of Muon runs")
    ap.add_argument("--muon_adamw_lrs", default=None, help="comma-separated lr_adamw grid of Muon runs")
    ap.add_argument("--adamw_lrs", default=None, help="comma-separated lr_adamw grid of the AdamW baseline")
    ap.add_argument("--work_dir", default=None, help="each run's --out_dir goes under here (default: a temp dir)")
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--eval_iters 40'")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")

    spec = dict(SCALES[args.scale]) if args.stage == "pretrain" else {**SCALES[args.scale], **SFT}
    grids = {"muon_lrs": parse_lrs(args.muon_lrs, spec["muon_lrs"]),
             "muon_adamw_lrs": parse_lrs(args.muon_adamw_lrs, spec["muon_adamw_lrs"]),
             "adamw_lrs": parse_lrs(args.adamw_lrs, spec["adamw_lrs"])}
    extra = shlex.split(args.extra)
    check_extra(extra)
    data_dir = os.path.abspath(prepared_data(args.stage, args.data_path))  # runs start in the repo root
    common = ["--eval_interval", str(spec["eval_interval"]), "--log_interval", "25", "--data_path", data_dir]
    if args.stage == "pretrain":
        common = spec["model"] + common + ["--sample_prompt", ""]
    if args.init_from:
        common += ["--init_from", os.path.abspath(args.init_from)]
    common += extra
    steps = args.steps or spec["steps"]
    if args.stage == "pretrain":
        per_step, n_train = tokens_per_step(common), train_tokens(data_dir)
        steps = args.steps or steps_within_one_epoch(n_train, per_step, steps)
        print(f"steps: {steps} x {per_step:,} tokens = {steps * per_step / n_train:.2f} epochs of "
              f"{n_train:,} training tokens", flush=True)
    common += ["--max_steps", str(steps)]
    jobs = args.jobs or max(1, len(visible_gpus()))
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="compare_optimizers_"))
    results = sweep_and_rerun(args, grids, common, jobs, work)
    print(f"run logs and metrics: {work}")
    report(args, ap, grids, results, data_dir, steps, jobs)


def sweep_and_rerun(args, grids, common, jobs, work):
    """Stage 1 (the grids at seed 0), then stage 2 (each optimizer's best config at seeds 1..n-1).
    Returns {"sweep": {config: result}, "best": {opt: config}, "seeds": {opt: [results by seed]}}."""
    def launch(todo):  # [(config, seed)] -> {(config, seed): result}
        tasks = [(os.path.join(work, config_name(c, seed)), common + config_flags(c) + ["--seed", str(seed)])
                 for c, seed in todo]
        return dict(zip(todo, run_parallel(SCRIPTS[args.stage], tasks, jobs, log=print)))

    configs = [("muon", m, a) for m in grids["muon_lrs"] for a in grids["muon_adamw_lrs"]]
    configs += [("adamw", None, a) for a in grids["adamw_lrs"]]
    print(f"stage 1: {len(configs)} runs at seed 0, {jobs} at a time", flush=True)
    sweep = {c: r for (c, _), r in launch([(c, 0) for c in configs]).items()}
    best = {}
    for opt in ("muon", "adamw"):
        best[opt] = best_config({c: final_loss(r) for c, r in sweep.items() if c[0] == opt})
        if best[opt] is None:
            first = next(r for c, r in sweep.items() if c[0] == opt)
            sys.exit(f"every {opt} run of the sweep failed or diverged; see {first['log']}")
    seeds = {opt: [sweep[best[opt]]] for opt in best}
    if args.seeds > 1:
        print(f"stage 2: the best configs at seeds 1..{args.seeds - 1}", flush=True)
        todo = [(c, seed) for seed in range(1, args.seeds) for c in best.values()]
        for (config, seed), r in launch(todo).items():  # in seed order
            if r["status"] != "ok":
                sys.exit(f"{config_name(config, seed)} {r['status']} ({r['log']})")
            seeds[config[0]].append(r)
    return {"sweep": sweep, "best": best, "seeds": seeds}


# ------------------------------------------------------------------------------------ the report

def summary_rows(grids, results):
    """One row per optimizer: its best config and the spread of its final val loss over seeds."""
    curves = {opt: mean_curve([evals(r["rows"]) for r in rs]) for opt, rs in results["seeds"].items()}
    mean = {opt: [(x, m) for x, m, _, _ in c] for opt, c in curves.items()}
    muon_tokens, efficiency = token_efficiency(mean["muon"], mean["adamw"])
    per_seed = [token_efficiency(evals(m["rows"]), evals(a["rows"]))[1]
                for m, a in zip(results["seeds"]["muon"], results["seeds"]["adamw"])]
    rows = []
    for opt, (_, lr_muon, lr_adamw) in results["best"].items():
        runs = results["seeds"][opt]
        loss = spread([final_loss(r) for r in runs])
        axes = ({"lr_muon": grids["muon_lrs"], "lr_adamw": grids["muon_adamw_lrs"]} if opt == "muon"
                else {"lr_adamw": grids["adamw_lrs"]})
        row = {"optimizer": opt, "lr_muon": lr_muon, "lr_adamw": lr_adamw, "seeds": len(runs),
               "final_val_loss_mean": round(loss["mean"], 4), "final_val_loss_min": round(loss["min"], 4),
               "final_val_loss_max": round(loss["max"], 4),
               "final_val_loss_std": round(loss["std"], 4) if loss["std"] is not None else None,
               "tokens": mean[opt][-1][0],
               "optimum_on_grid_edge": edge_flags({"lr_muon": lr_muon, "lr_adamw": lr_adamw}, axes),
               "wall_s_mean": round(statistics.fmean(r["wall"] for r in runs), 1)}
        if opt == "muon":
            row["tokens_to_adamw_final"] = round(muon_tokens) if muon_tokens else None
            row["token_efficiency"] = round(efficiency, 2) if efficiency else None
            if len(per_seed) > 1:
                row["token_efficiency_per_seed"] = [round(e, 2) if e else None for e in per_seed]
        acc = [[m["answer_acc"] for m in r["rows"] if "answer_acc" in m] for r in runs]
        if all(acc):
            row["answer_acc_mean"] = round(statistics.fmean(a[-1] for a in acc), 4)
        rows.append(row)
    return rows, curves


def sweep_tables(grids, results):
    """Markdown of the seed-0 sweep: Muon as an lr_muon x lr_adamw grid, AdamW as one row; * = best."""
    def cell(config):
        r = results["sweep"][config]
        text = f"{final_loss(r):.4f}" if final_loss(r) is not None else r["status"].split(":")[0]
        return text + (" *" if config == results["best"][config[0]] else "")

    lines = ["Muon sweep (seed 0, final val loss; rows lr_muon, columns lr_adamw):", "",
             "| lr_muon | " + " | ".join(f"{a:g}" for a in grids["muon_adamw_lrs"]) + " |",
             "|---|" + "---|" * len(grids["muon_adamw_lrs"])]
    for m in grids["muon_lrs"]:
        lines.append(f"| {m:g} | " + " | ".join(cell(("muon", m, a)) for a in grids["muon_adamw_lrs"]) + " |")
    lines += ["", "AdamW sweep (seed 0, final val loss):", "",
              "| lr_adamw | " + " | ".join(f"{a:g}" for a in grids["adamw_lrs"]) + " |",
              "|---|" + "---|" * len(grids["adamw_lrs"]),
              "| final | " + " | ".join(cell(("adamw", None, a)) for a in grids["adamw_lrs"]) + " |"]
    return lines


def summary_table(rows):
    accuracy = all("answer_acc_mean" in r for r in rows)  # SFT only
    head = ["optimizer", "lr_muon", "lr_adamw", "seeds", "final val loss mean", "min–max", "std",
            "tokens to AdamW's final", "token efficiency (per seed)", "optimum on grid edge", "wall s"]
    head += ["answer acc mean"] if accuracy else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        muon = r["optimizer"] == "muon"
        eff = r["token_efficiency"] if muon else 1.0
        per_seed = ", ".join("never" if e is None else str(e) for e in r.get("token_efficiency_per_seed", []))
        reach = r["tokens_to_adamw_final"] if muon else "-"
        cells = [r["optimizer"], r["lr_muon"] or "-", r["lr_adamw"], r["seeds"], r["final_val_loss_mean"],
                 f"{r['final_val_loss_min']}–{r['final_val_loss_max']}", r["final_val_loss_std"] or "-",
                 "never" if reach is None else reach,
                 ("never reached" if eff is None else str(eff)) + (f" ({per_seed})" if per_seed else ""),
                 ", ".join(r["optimum_on_grid_edge"]) or "no", r["wall_s_mean"]]
        cells += [r["answer_acc_mean"]] if accuracy else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def report(args, ap, grids, results, data_dir, steps, jobs):
    """Write <name>.md/.json (+ .png), print the markdown: the summary table comes last."""
    import torch
    rows, curves = summary_rows(grids, results)
    data_name = data_label(data_dir)
    name = f"compare_{args.stage}_{args.scale}_{data_name}"
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": portable_command(args, ap),
            "data": describe_data(data_name, data_info(data_dir)),
            "steps": steps, "tokens per run": rows[0]["tokens"] if args.stage == "pretrain" else "-",
            "seeds": f"{args.seeds} (seed 0 sweeps, the best configs rerun at 1..{args.seeds - 1})"
                     if args.seeds > 1 else "1",
            "spread": "min–max and sample std of final val loss over seeds",
            "token efficiency": "tokens AdamW's mean curve needs to reach its final val loss / tokens Muon's "
                                "mean curve needs (linear interpolation between evals); per seed: seed i vs seed i",
            "wall": f"{jobs} run(s) at a time shared the machine, so wall times include that sharing"}
    warnings = [f"{r['optimizer']} optimum on the edge of its {', '.join(r['optimum_on_grid_edge'])} grid: "
                f"widen the grid there" for r in rows if r["optimum_on_grid_edge"]]
    warnings += [f"--{flag} has one value: not swept" for flag, grid in grids.items() if len(grid) == 1]
    lines = [f"# {name}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += sweep_tables(grids, results) + [""] + [f"Warning: {w}" for w in warnings]
    lines += ([""] if warnings else []) + summary_table(rows)
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
        f.write(text)
    sweep = {config_name(c, 0): final_loss(r) for c, r in results["sweep"].items()}
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "sweep": sweep, "warnings": warnings,
                   "curves": {opt: [list(p) for p in c] for opt, c in curves.items()}}, f, indent=1)
    labels = {r["optimizer"]: f"{r['optimizer']} (" + (f"lr_muon {r['lr_muon']:g}, " if r["lr_muon"] else "")
              + f"lr_adamw {r['lr_adamw']:g}), {r['seeds']} seeds" for r in rows}
    plot({opt: [(x, m) for x, m, _, _ in c] for opt, c in curves.items()}, labels,
         os.path.join(args.out_dir, name + ".png"), f"Muon vs AdamW: {args.stage}, {args.scale}, {data_name}",
         bands={opt: [(x, lo, hi) for x, _, lo, hi in c] for opt, c in curves.items()},
         xlabel="tokens" if args.stage == "pretrain" else "step")
    print(f"wrote {os.path.join(args.out_dir, name)}.{{md,json}}\n")
    print(text, flush=True)


def plot(curves, labels, path, title, bands=None, xlabel=None):
    """Val loss vs tokens (or steps), one line per curve; bands: {name: [(x, low, high)]} shaded."""
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
        line, = ax.plot(xs, ys, marker="o", ms=3, label=labels[opt])
        if bands and opt in bands:
            bx, lo, hi = zip(*bands[opt][1:])
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel or ("tokens" if next(iter(curves.values()))[-1][0] > 10_000 else "step"))
    ax.set_ylabel("val loss" + (" (mean, band: min–max over seeds)" if bands else ""))
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
