"""Plumbing the three training scripts share: flags, distributed setup, the two optimizers,
gradient sync and clipping, learning-rate schedule, checkpoints, and logging.

The algorithm of each stage lives in its own script; this file only holds what they would
otherwise repeat word for word.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from muon import DistMuon, Muon


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def die(msg: str):
    """Stop with one clear message and a non-zero exit (bad input, not a bug)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


# ------------------------------------------------------------------------------------ flags

def train_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every stage script has, under the same names (stage defaults are set by each script)."""
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--data_path", default=None, help="data to train on (default: the embedded corpus, prepared on first use)")
    a("--out_dir", default="out", help="where checkpoints and metrics go")
    a("--init_from", default=None, help="checkpoint whose weights start this stage")
    a("--resume", action="store_true", help="continue this stage from <out_dir>/<stage>.pt exactly")
    # model shape (pretraining builds it; later stages check it against --init_from)
    a("--hidden_size", type=int, default=None)
    a("--num_hidden_layers", type=int, default=None)
    a("--num_attention_heads", type=int, default=None)
    a("--num_key_value_heads", type=int, default=None)
    a("--max_seq_len", type=int, default=None)
    # batch and length of training
    a("--batch_size", type=int, default=16, help="sequences per micro-batch per process")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--epochs", type=float, default=None, help="passes over the training data (used when --max_steps is 0)")
    a("--max_steps", type=int, default=None, help="optimizer steps (0: derive from --epochs)")
    # optimizers and schedules
    a("--optimizer", choices=["muon", "adamw"], default="muon", help="adamw: AdamW for every parameter (baseline)")
    a("--lr_muon", type=float, default=0.02, help="peak LR of Muon (matrices in the blocks)")
    a("--lr_adamw", type=float, default=5e-4, help="peak LR of AdamW (embedding, head, norms)")
    a("--momentum", type=float, default=0.95, help="Muon momentum (after its warmup)")
    a("--momentum_start", type=float, default=0.85, help="Muon momentum at step 0 and after the cool-down")
    a("--momentum_warmup_steps", type=int, default=0, help="ramp Muon momentum from --momentum_start (0: off)")
    a("--momentum_cooldown_steps", type=int, default=0, help="ramp it back to --momentum_start at the end")
    a("--ns_coefficients", choices=["quintic", "polar_express"], default="quintic",
      help="Newton-Schulz polynomials")
    a("--normuon", action=argparse.BooleanOptionalAction, default=False, help="NorMuon row/column normalisation")
    a("--normuon_beta2", type=float, default=0.95, help="NorMuon's second-moment decay")
    a("--cautious_wd", action=argparse.BooleanOptionalAction, default=False,
      help="Muon decays a weight only where its update has the same sign")
    a("--weight_decay", type=float, default=0.0, help="decoupled weight decay of both optimizers' matrices")
    a("--warmup_steps", type=int, default=20)
    a("--min_lr_ratio", type=float, default=0.1, help="cosine decays each LR to this fraction of its peak")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    # hardware
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on CUDA)")
    a("--seed", type=int, default=1337)
    # logging and checkpoints
    a("--log_interval", type=int, default=10)
    a("--eval_interval", type=int, default=100)
    a("--eval_iters", type=int, default=20, help="batches per evaluation")
    a("--save_interval", type=int, default=0, help="also save every N steps (0: only at evals and the end)")
    a("--use_wandb", action="store_true")
    a("--wandb_project", default="muon-minimal")
    return p


# ------------------------------------------------------------------------------ distributed

def setup_distributed(device_arg: str):
    """Returns (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU; one GPU per process."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        die("--device cuda was asked for but no CUDA GPU is available")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_arg)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def setup_run(args):
    """Distributed init, then the run-wide defaults every stage shares: bf16 autocast and
    torch.compile on CUDA, fp32 and eager on CPU, the seed, TF32 matmuls.
    Returns (rank, world_size, device, autocast context, use_compile); fills in args.dtype."""
    rank, world_size, device = setup_distributed(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, device, autocast(device, args.dtype), use_compile


def cleanup_distributed():
    if dist.is_initialized():
        gc.collect()  # drop finished async work handles (they hold tensors) while the interpreter is whole
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
        dist.destroy_process_group()


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


# ------------------------------------------------------------------------------- optimizers

def make_optimizers(muon_params, adamw_params, args, world_size: int, device: torch.device):
    """Muon (DistMuon under torchrun) for the block matrices, AdamW for the rest.

    AdamW decays only its matrices (embedding and, untied, the head), never norms or vectors.
    """
    muon_opt = None
    if muon_params:
        muon_cls = DistMuon if world_size > 1 else Muon
        muon_opt = muon_cls(muon_params, lr=args.lr_muon, momentum=args.momentum, weight_decay=args.weight_decay,
                            ns_coefficients=args.ns_coefficients, normuon=args.normuon, beta2=args.normuon_beta2,
                            cautious_wd=args.cautious_wd)
    groups = [dict(params=[p for p in adamw_params if p.ndim >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in adamw_params if p.ndim < 2], weight_decay=0.0)]
    adamw_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr_adamw, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.type == "cuda")
    return muon_opt, adamw_opt


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to min_lr_ratio * peak at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def muon_momentum(step: int, total_steps: int, args) -> float:
    """--momentum, ramped up from --momentum_start over the first --momentum_warmup_steps and
    back down over the last --momentum_cooldown_steps. Lower momentum early follows the fast-
    changing gradients of a fresh model; modded-nanogpt warms it up from 0.85 to 0.95."""
    m = args.momentum
    if step < args.momentum_warmup_steps:
        m = args.momentum_start + (m - args.momentum_start) * step / args.momentum_warmup_steps
    left = total_steps - step
    if left < args.momentum_cooldown_steps:
        m = args.momentum_start + (m - args.momentum_start) * left / args.momentum_cooldown_steps
    return m


def schedules(step: int, total_steps: int, args, muon_opt, adamw_opt) -> tuple:
    """Set this step's lr_muon, lr_adamw and Muon momentum in the optimizers; returns them.

    Each optimizer has its own schedule: linear warmup, then cosine to min_lr_ratio * peak.
    """
    lr_muon = cosine_lr(step, total_steps, args.lr_muon, args.warmup_steps, args.min_lr_ratio)
    lr_adamw = cosine_lr(step, total_steps, args.lr_adamw, args.warmup_steps, args.min_lr_ratio)
    momentum = muon_momentum(step, total_steps, args)
    for group in muon_opt.param_groups if muon_opt is not None else []:
        group["lr"], group["momentum"] = lr_muon, momentum
    for group in adamw_opt.param_groups:
        group["lr"] = lr_adamw
    return lr_muon, lr_adamw, momentum


def sync_grads(params, world_size: int):
    """Average these gradients over ranks, async: launched before Muon's work so they overlap it.

    Only AdamW's parameters go through here; DistMuon averages the Muon gradients itself
    (there is no DDP wrapper, so nothing is averaged twice). Returns the handles to wait on.
    """
    if world_size == 1:
        return []
    return [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True) for p in params if p.grad is not None]


def grad_sq_sum(params) -> torch.Tensor:
    """Sum of squared gradient entries (accumulated in fp32) as a 0-D tensor on the parameters' device.

    One multi-tensor norm per dtype. Squaring, summing and adding per tensor was ~400 small
    kernels per step at GPT-2 small: ~1 ms of GPU time on one H200, plus the gaps between them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())  # a 0-D CPU tensor adds to one on any device
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()


def clip_grads(muon_opt, muon_params, adamw_params, max_norm: float, world_size: int, sync: bool = True):
    """Global norm of the *averaged* gradient, and the factor that clips it to max_norm.

    AdamW gradients are already averaged (sync_grads). Single-process Muon gradients are the
    averaged ones too. Under DistMuon the averaged Muon gradients exist only as each owner's
    slice after its reduce-scatter, so DistMuon runs that phase now and sums the squares of the
    slices across ranks (grad_sq_sum). The Muon factor is handed to muon_opt.step(grad_scale=).
    Returns (norm, scale): floats with sync=True; with sync=False 0-D tensors, so the host never
    waits for the GPU here (a non-finite norm then shows up as a NaN loss at the next log).
    """
    sq = grad_sq_sum(adamw_params)
    if muon_opt is not None:
        sq = sq + (muon_opt.grad_sq_sum() if world_size > 1 else grad_sq_sum(muon_params))
    norm = sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
        adamw_grads = [p.grad for p in adamw_params if p.grad is not None]
        if adamw_grads:  # foreach ops refuse an empty list
            torch._foreach_mul_(adamw_grads, scale)
    else:
        scale = torch.ones_like(norm)
    return (norm.item(), scale.item()) if sync else (norm, scale)


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path: str, ckpt: dict):
    """Atomic: write a temp file beside `path`, then rename over it, so a crash mid-save never
    destroys the previous checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        die(f"checkpoint {path} does not exist (train the previous stage first, or check the path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        die(f"checkpoint {path} could not be read ({type(e).__name__}: {e})")


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_model_matches(ckpt: dict, args, tokenizer_fingerprint: str | None, path: str):
    """A checkpoint from another model shape or tokenizer stops with a clear message."""
    cfg = ckpt["model_config"]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_seq_len"):
        want = getattr(args, name, None)
        if want is not None and want != cfg[name]:
            die(f"{path} has {name}={cfg[name]} but --{name} {want} was given; drop the flag or use a "
                f"checkpoint of that shape")
    if tokenizer_fingerprint is not None and ckpt.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint):
        die(f"{path} was trained with another tokenizer ({ckpt.get('tokenizer_fingerprint')}) than the data's "
            f"({tokenizer_fingerprint}); prepare the data with the checkpoint's tokenizer")


# ---------------------------------------------------------------------------------- logging

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device):
    """Dense bf16 peak of known GPUs, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class MetricsLogger:
    """Rows to the console, to <out_dir>/<stage>_metrics.jsonl and, with --use_wandb, to W&B."""

    def __init__(self, args, stage: str, rank: int, resume: bool):
        self.rank, self.wandb = rank, None
        self.path = os.path.join(args.out_dir, f"{stage}_metrics.jsonl")
        if rank != 0:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if args.use_wandb:
            try:
                import wandb
            except ImportError:
                die("--use_wandb needs the wandb package: pip install wandb")
            self.wandb = wandb.init(project=args.wandb_project, name=f"{stage}-{time.strftime('%m%d-%H%M%S')}",
                                    config=vars(args))

    def log(self, row: dict, console: str | None = None):
        if self.rank != 0:
            return
        if console:
            print(console, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------ later stages: SFT, DPO, sample

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "embedded")


def resolve_chat_data(kind: str, data_path: str | None, rank: int, world_size: int):
    """Where the SFT or DPO data of a run is: (train_file, val_file or None, data_dir or None).

    Nothing: the embedded corpus (rank 0 prepares it on first use). A directory: its
    <kind>_train.jsonl and <kind>_val.jsonl (as data/prepare.py writes them). A .jsonl file:
    that file alone; the caller then splits a validation set off it (split_val) or reads --val_path.
    """
    from data.prepare import ensure_prepared

    if data_path is None:
        if rank == 0:
            ensure_prepared(EMBEDDED_DIR)
        if world_size > 1:
            dist.barrier()
        data_path = EMBEDDED_DIR
    if os.path.isdir(data_path):
        train, val = (os.path.join(data_path, f"{kind}_{split}.jsonl") for split in ("train", "val"))
        if not os.path.exists(train):
            die(f"--data_path {data_path}: directory has no {kind}_train.jsonl; give a .jsonl file or a "
                f"directory prepared by data/prepare.py with --{kind}_path")
        return train, val if os.path.exists(val) else None, data_path
    if not os.path.exists(data_path):
        die(f"--data_path {data_path}: no such file or directory")
    return data_path, None, None


def split_val(records: list, seed: int, fraction: float = 0.02):
    """(train, val): about `fraction` of the records (at least one) held out, chosen by seed."""
    if len(records) < 2:
        die(f"{len(records)} record(s) cannot be split into train and val; add data or pass --val_path")
    n_val = max(1, round(fraction * len(records)))
    is_val = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in is_val],
            [r for i, r in enumerate(records) if i in is_val])


def load_checkpoint_tokenizer(ckpt: dict, path: str, fallback_dir: str | None = None, override: str | None = None):
    """The tokenizer a checkpoint was trained with: `override` if given, else the recorded
    tokenizer_path, else fallback_dir/tokenizer.json (a checkpoint copied from another machine).
    check_model_matches then compares fingerprints, so a different tokenizer is caught."""
    from data.tokenizer import load_tokenizer

    recorded = ckpt.get("tokenizer_path")
    candidates = [override] if override else [recorded, fallback_dir and os.path.join(fallback_dir, "tokenizer.json")]
    for candidate in candidates:
        # a file, or a tiktoken name such as "gpt2" (no path separator, no .json)
        named = candidate and os.sep not in candidate and not candidate.endswith(".json")
        if candidate and (os.path.isfile(candidate) or named or override):
            try:
                return load_tokenizer(candidate)
            except (ValueError, RuntimeError, FileNotFoundError) as e:
                die(str(e))
    die(f"{path}: its tokenizer {recorded} does not exist; pass the data directory it was prepared in "
        f"as --data_path (or --tokenizer to sample.py)")


@torch.no_grad()
def answer_accuracy(model, tok, questions: list[dict], device, ctx, rank: int = 0, world_size: int = 1,
                    max_new_tokens: int = 32):
    """Fraction of questions answered correctly by greedy generation: each record's conversation
    without its final assistant turn is the prompt, the reply runs to <|im_end|>, and
    data.corpus.answer_is_correct grades it against record["answer"] and record["choices"].
    Ranks take every world_size-th question; the counts are summed. Returns (accuracy, n).

    One question at a time: prompts differ in length and the model has no padding mask. Pass
    the uncompiled model (the KV cache changes shapes every token)."""
    from data.chat import render_prompt
    from data.corpus import answer_is_correct

    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, asked
    for q in questions[rank::world_size]:
        prompt = render_prompt(tok, q["conversations"])
        room = min(max_new_tokens, model.config.max_seq_len - len(prompt))
        if room < 1:
            continue  # the caller filters these out up front (fits_for_answer); never counted
        idx = torch.tensor([prompt], device=device)
        reply = []
        with ctx:
            for t in model.stream(idx, room, temperature=0.0, eos_id=tok.im_end_id):
                if t.item() == tok.im_end_id:
                    break
                reply.append(t.item())
        counts[0] += answer_is_correct(tok.decode(reply), q["answer"], q["choices"])
        counts[1] += 1
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, asked = counts.tolist()
    return correct / max(asked, 1), int(asked)


def answer_questions(eval_path: str | None, data_dir: str | None, tok, max_seq_len: int, n: int):
    """(questions, path): up to n held-out questions for answer_accuracy from an SFT-format jsonl
    whose records carry "answer" and "choices" keys: eval_path if given, else the data directory's
    sft_test.jsonl if there is one (the embedded corpus has it), else none. Questions whose prompt
    leaves no room for a reply within max_seq_len are left out."""
    from data.chat import render_prompt
    from data.readers import DataError, read_sft_jsonl

    path = eval_path or (data_dir and os.path.join(data_dir, "sft_test.jsonl"))
    if n <= 0 or not path or (eval_path is None and not os.path.exists(path)):
        return [], None
    try:
        records = read_sft_jsonl(path)
    except DataError as e:
        die(str(e))
    if not all("answer" in r and "choices" in r for r in records):
        die(f"{path}: answer accuracy needs every record to carry \"answer\" and \"choices\" keys "
            f"(as data/embedded/sft_test.jsonl does)")
    fit = [r for r in records if len(render_prompt(tok, r["conversations"])) + 8 <= max_seq_len]
    if len(fit) < len(records):
        print0(f"{path}: {len(records) - len(fit)} of {len(records)} questions do not fit max_seq_len="
               f"{max_seq_len} with room for a reply; left out")
    return fit[:n], path
