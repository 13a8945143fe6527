"""Stage 1: next-token pretraining of the QK-norm transformer with Muon (matrices) + AdamW (the rest).

    python train_pretrain_muon.py                                   # CPU demo on the embedded corpus
    torchrun --nproc_per_node 8 train_pretrain_muon.py --hidden_size 768 --num_hidden_layers 12 ...

Reads top to bottom: flags -> data -> model -> the Muon/AdamW split -> the two optimizers -> the two
schedules -> loop (forward, backward, accumulation, gradient sync, clip, both steps) -> eval -> save.
"""
import math
import os
import sys
import textwrap
import time

import torch
import torch.distributed as dist

from common import (EXIT_INTERRUPTED, MetricsLogger, any_rank, bounded, catch_interrupts, check_model_matches,
                    check_resume, cleanup_distributed, die, gathered, load_checkpoint, load_optimizer_state,
                    load_resume_checkpoint, lock_out_dir, micro_steps, print0, rng_state, save_checkpoint, set_rng_state,
                    setup_run, step_speed, stop_on_nan, synchronized_time, total_steps_of, train_arg_parser, wrap_model)
from data.loaders import TokenWindowLoader, eval_batches, eval_bytes_per_token
from data.cache import prepare_source
from data.readers import DataError
from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig, split_params, split_summary
from muon import DistMuon, FSDPMuon, Muon, last_step_ms, step_optimizers

STAGE = "pretrain"
# 3.5M parameters on the embedded corpus: a CPU demo in minutes; the head untied, so that the embedding
# trains at its own LR
DEFAULT_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     max_seq_len=256, rope_theta=10000.0, norm_weights=True, tie_word_embeddings=False)
# AdamW's peak LR by --optimizer: AdamW training every parameter wants a lower one than AdamW on the
# embedding, head and norms beside Muon
LR_ADAMW = {"muon": 8e-3, "adamw": 2e-3}
# an untied embedding is a lookup table whose rows see few gradients: it trains at a far higher LR than the
# head, without weight decay (a tied one is the head too and trains as the head does)
LR_EMBEDDING_UNTIED = 0.4
ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    defaults = (f"Defaults: where no checkpoint gives the model's shape, {DEFAULT_SHAPE}. --lr_adamw None: "
                + ", ".join(f"{lr} with --optimizer {opt}" for opt, lr in LR_ADAMW.items()) + ". "
                f"--lr_embedding None: {LR_EMBEDDING_UNTIED} with an untied head, --lr_adamw with a tied one.")
    p = train_arg_parser(__doc__ + "\n" + textwrap.fill(defaults, 100) + "\n")
    # stage defaults: a model and a run sized for a few minutes on a 2-core CPU
    # (the model shape stays None here: a --resume run takes its shape from the checkpoint)
    # LRs: the best at 768x12 on English and close to it on synthetic stories and Python source; weight decay
    # and Muon's momentum schedule helped on all three; the warmdown schedule, NorMuon, cautious weight decay
    # and the untied embedding at its own LR won on Python source at d12, English and the embedded corpus
    # (README: how the defaults were chosen).
    p.set_defaults(batch_size=16, max_steps=300, lr_muon=0.04, lr_adamw=None, momentum=0.95,
                   weight_decay=0.1, momentum_warmup_steps=100, momentum_cooldown_steps=50,
                   warmup_steps=20, min_lr_ratio=0.05, normuon=True, cautious_wd=True,
                   eval_interval=100, eval_iters=20, log_interval=10)
    p.add_argument("--sample_prompt", default="Mia lives in", help="text continued at the end of the run")
    p.add_argument("--warmdown_ratio", type=bounded(float, 0, 1), default=0.65,
                   help="flat LR, then a linear decay to --min_lr_ratio over this share of the steps; 0: cosine "
                        "decay instead (default: %(default)s)")
    p.add_argument("--lr_embedding", type=bounded(float, 0, above=True), default=None,
                   help=f"peak LR of the token embedding (default: {LR_EMBEDDING_UNTIED} with an untied head, "
                        "--lr_adamw with a tied one)")
    p.add_argument("--weight_decay_embedding", type=bounded(float, 0), default=None,
                   help="decoupled weight decay of the token embedding (default: 0 with an untied head, "
                        "--weight_decay with a tied one)")
    args = p.parse_args()
    if args.lr_adamw is None:
        args.lr_adamw = LR_ADAMW[args.optimizer]
    return args


def lr_schedule(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr_ratio: float,
                warmdown_ratio: float) -> float:
    """Linear warmup to `peak`, flat at `peak`, then a linear decay to min_lr_ratio * peak over the last
    warmdown_ratio of the steps; with warmdown_ratio 0, a cosine decay from the warmup's end instead."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if warmdown_ratio:
        left = (total_steps - step) / max(1.0, warmdown_ratio * total_steps)
        return peak * (min_lr_ratio + (1 - min_lr_ratio) * min(1.0, left))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def muon_momentum(step: int, total_steps: int, args) -> float:
    """--momentum, ramped up from --momentum_start over the first --momentum_warmup_steps and back
    down over the last --momentum_cooldown_steps (modded-nanogpt warms it from 0.85 to 0.95: a
    fresh model's gradients change fast, and a shorter memory follows them)."""
    m = args.momentum
    if step < args.momentum_warmup_steps:
        m = args.momentum_start + (m - args.momentum_start) * step / args.momentum_warmup_steps
    if total_steps - step < args.momentum_cooldown_steps:
        m = args.momentum_start + (m - args.momentum_start) * (total_steps - step) / args.momentum_cooldown_steps
    return m


def resolve_data(data_path, rank, world_size):
    """A prepared directory; a raw .txt/.jsonl/.parquet file or folder, prepared once into
    data/prepared/<name>-<hash of its content>; nothing means the embedded corpus."""
    out = [prepare_source(data_path, os.path.join(ROOT, "data", "prepared"), os.path.join(ROOT, "data", "embedded"))
           if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(out, src=0)  # the other ranks get the directory without hashing the source
    return out[0]


@torch.no_grad()
def evaluate(model, val_path, batch_size, args, rank, world_size, device, ctx):
    """Mean loss over a fixed set of val windows, averaged over ranks."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in eval_batches(val_path, batch_size, args.max_seq_len, args.eval_iters * world_size, rank, world_size):
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
        count += 1
    model.train()
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        count *= world_size
    return (total / count).item()


def main():
    args = parse_args()
    rank, world_size, device, ctx, use_compile = setup_run(args)
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")
    ckpt = load_resume_checkpoint(ckpt_path, STAGE) if args.resume else None
    lock = lock_out_dir(args.out_dir, STAGE, rank)  # noqa: F841 (held until exit)
    # --init_from: continue pretraining from another run's weights, with fresh optimizers
    init = load_checkpoint(args.init_from) if args.init_from and ckpt is None else None
    saved_shape = (ckpt or init)["model_config"] if (ckpt or init) else None
    for name, default in DEFAULT_SHAPE.items():  # flags given > the checkpoint's shape > defaults
        if getattr(args, name) is None:  # a checkpoint without the field predates it: ModelConfig's default
            setattr(args, name, default if saved_shape is None
                    else saved_shape.get(name, ModelConfig.__dataclass_fields__[name].default))
    if args.lr_embedding is None:  # a tied embedding is the head too: it trains as the head does
        args.lr_embedding = args.lr_adamw if args.tie_word_embeddings else LR_EMBEDDING_UNTIED
    if args.weight_decay_embedding is None:
        args.weight_decay_embedding = args.weight_decay if args.tie_word_embeddings else 0.0

    # ---------------------------------------------------------------- data
    try:
        data_dir = resolve_data(args.data_path, rank, world_size)
        tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
        train_loader = TokenWindowLoader(os.path.join(data_dir, "train.bin"), args.batch_size, args.max_seq_len,
                                         rank, world_size, seed=args.seed, tokenizer=tok)
        val_path = os.path.join(data_dir, "val.bin")
        val_windows = (TokenWindowLoader(val_path, 1, args.max_seq_len).num_tokens - 1) // args.max_seq_len
        if val_windows < world_size:
            raise DataError(f"{val_path}: too short for one window of {args.max_seq_len} tokens per process")
        eval_batch_size = min(args.batch_size, val_windows // world_size)  # a small val set still evaluates
        val_bytes_per_token = eval_bytes_per_token(val_path, tok.token_bytes(), eval_batch_size, args.max_seq_len,
                                                   args.eval_iters * world_size, world_size)
    except (DataError, FileNotFoundError, ValueError) as e:
        die(str(e))
    tokens_per_step = args.batch_size * args.max_seq_len * args.accumulation_steps * world_size
    total_steps = total_steps_of(args, train_loader.num_tokens / tokens_per_step)
    print0(f"data: {data_dir} ({train_loader.num_tokens:,} train tokens, vocab {tok.vocab_size}); "
           f"{tokens_per_step:,} tokens per step, {total_steps} steps "
           f"({total_steps * tokens_per_step / train_loader.num_tokens:.2f} epochs)")

    # ---------------------------------------------------------------- model
    for c, path in ((init, args.init_from), (ckpt, ckpt_path)):
        if c is not None:
            check_model_matches(c, args, tok.fingerprint, path)
    if ckpt is not None:
        check_resume(ckpt, ckpt_path, args, total_steps, world_size)
    try:
        # a checkpoint's own shape (its rope_theta, intermediate_size, ... too); the flags checked equal above
        config = ModelConfig(**(ckpt or init)["model_config"]) if (ckpt or init) else ModelConfig(
            vocab_size=tok.vocab_size, hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, max_seq_len=args.max_seq_len, rope_theta=args.rope_theta,
            norm_weights=args.norm_weights, tie_word_embeddings=args.tie_word_embeddings)
    except ValueError as e:
        die(str(e))
    raw_model = GPT(config).to(device)
    if ckpt is not None or init is not None:
        raw_model.load_state_dict((ckpt or init)["model"])
    del init
    model = wrap_model(raw_model, args, use_compile)  # checkpointing, FSDP2 and compile as the flags say
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {config}")

    # ---------------------------------------------------------------- the split and the two optimizers
    # Every matrix inside the transformer blocks goes to Muon (DistMuon under torchrun); the
    # embedding, the (tied) head, all norm weights and anything 1-D go to AdamW, which decays only
    # its matrices. --optimizer adamw: AdamW for everything, the baseline.
    muon_params, adamw_params = split_params(raw_model)
    print0(split_summary(raw_model, muon_params, adamw_params))
    if args.optimizer == "adamw":
        muon_params, adamw_params = [], muon_params + adamw_params
    muon_opt = (FSDPMuon if args.fsdp else DistMuon if world_size > 1 else Muon)(
        muon_params, lr=args.lr_muon, momentum=args.momentum, weight_decay=args.weight_decay,
        ns_coefficients=args.ns_coefficients, normuon=args.normuon, beta2=args.normuon_beta2,
        cautious_wd=args.cautious_wd) if muon_params else None
    # AdamW's groups: the token embedding (its own peak LR, --lr_embedding), the other matrices (an untied
    # head; every matrix with --optimizer adamw), the vectors (no weight decay)
    embedding = raw_model.embed_tokens.weight
    adamw_peaks = [args.lr_embedding, args.lr_adamw, args.lr_adamw]
    adamw_opt = torch.optim.AdamW([dict(params=[embedding], weight_decay=args.weight_decay_embedding),
                                   dict(params=[p for p in adamw_params if p.ndim >= 2 and p is not embedding],
                                        weight_decay=args.weight_decay),
                                   dict(params=[p for p in adamw_params if p.ndim < 2], weight_decay=0.0)],
                                  lr=args.lr_adamw, betas=(args.adamw_beta1, args.adamw_beta2), eps=1e-8,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")  # fp16 only: else a no-op
    step, skipped, val_loss, val_step = 0, 0, None, None
    if ckpt is not None:
        if muon_opt is not None:
            muon_opt.load_state_dict(ckpt["muon_opt"])
        load_optimizer_state(adamw_opt, ckpt["adamw_opt"])
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
        val_loss, val_step = ckpt.get("val_loss"), ckpt.get("val_step")  # the last evaluation, logged by that run
        print0(f"resumed {ckpt_path} at step {step} (saved by {ckpt['world_size']} process(es))")
    del ckpt

    def save(step, val_loss):
        # collective: DistMuon gathers its state, FSDP its shards, on every rank; rank 0 writes
        muon_state = muon_opt.state_dict() if muon_opt is not None else None
        model_state, adamw_state = gathered(raw_model.state_dict()), gathered(adamw_opt.state_dict())
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "stage": STAGE, "step": step, "model": model_state,
                "model_config": vars(config), "muon_opt": muon_state, "adamw_opt": adamw_state,
                "scaler": scaler.state_dict(), "skipped_steps": skipped,
                "data": train_loader.state_dict(), "rng": rng_state(device), "args": vars(args),
                "world_size": world_size, "val_loss": val_loss, "val_step": val_step, "init_from": args.init_from,
                "tokenizer_path": os.path.abspath(os.path.join(data_dir, "tokenizer.json")),
                "tokenizer_fingerprint": tok.fingerprint})

    # ---------------------------------------------------------------- loop
    interrupted = catch_interrupts()  # Ctrl-C or SIGTERM: save at the next logged step, exit
    logger = MetricsLogger(args, STAGE, rank, resume=args.resume, steps=(step, total_steps))
    flops_per_token = raw_model.flops_per_token()

    def is_logged(step):  # the host waits for the GPU only on these steps
        return (step % args.log_interval == 0 or step == total_steps or step % args.eval_interval == 0
                or (args.save_interval and step % args.save_interval == 0))

    t_start, start_step = time.time(), step
    t_log, step_log, history = t_start, step, []
    paused_s = 0.0  # time in evaluations and saves: train_s leaves it out
    while True:
        last = step >= total_steps
        if (step % args.eval_interval == 0 or last) and step != val_step:  # a resumed step has its row
            t_pause = synchronized_time(device)
            val_loss, val_step = evaluate(model, val_path, eval_batch_size, args, rank, world_size, device, ctx), step
            if not math.isfinite(val_loss):
                die(f"val loss is {val_loss} at step {step}; stopping (the last checkpoint is intact)")
            val_bpb = val_loss / math.log(2) / val_bytes_per_token
            logger.log({"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "tokens": step * tokens_per_step,
                        "train_s": t_pause - t_start - paused_s})
            if step > start_step:
                save(step, val_loss)
            paused_s += time.time() - t_pause
        elif args.save_interval and step % args.save_interval == 0 and step > start_step:
            t_pause = synchronized_time(device)
            save(step, val_loss)
            paused_s += time.time() - t_pause
        if last:
            break

        # the two schedules: each optimizer its own warmup, flat stretch and warmdown, and Muon's momentum
        lr_muon = lr_schedule(step, total_steps, args.lr_muon, args.warmup_steps, args.min_lr_ratio, args.warmdown_ratio)
        lr_adamw = lr_schedule(step, total_steps, args.lr_adamw, args.warmup_steps, args.min_lr_ratio, args.warmdown_ratio)
        momentum = muon_momentum(step, total_steps, args)
        for group in muon_opt.param_groups if muon_opt is not None else []:
            group["lr"], group["momentum"] = lr_muon, momentum
        for group, group_peak in zip(adamw_opt.param_groups, adamw_peaks):
            group["lr"] = lr_adamw * group_peak / args.lr_adamw

        # forward and backward over accumulation_steps micro-batches
        stats = torch.zeros(1, device=device)  # loss
        for _ in micro_steps(model, args.accumulation_steps):
            x, y = train_loader.next_batch()
            if device.type == "cuda":  # pinned memory lets the copy run without stalling the host
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx:
                _, loss = model(x, y)
            loss = loss / args.accumulation_steps
            scaler.scale(loss).backward()
            stats += loss.detach()
        if world_size > 1:  # log the global batch's numbers; every rank then agrees on a NaN too
            dist.all_reduce(stats, op=dist.ReduceOp.AVG)
        history.append(stats)

        # the step after the backward: unscale -> average over ranks -> one global clip -> both steps -> zero
        grad_norm, stepped = step_optimizers(muon_opt, adamw_opt, args.grad_clip, scaler)
        skipped += not stepped
        step += 1
        if not is_logged(step):
            continue

        # ---- logged step: the losses since the last one, a log row, maybe stop
        losses = torch.stack(history)[:, 0].tolist()
        stop_on_nan(losses, step_log, args.out_dir)
        dt = (time.time() - t_log) / (step - step_log)
        logger.log({"step": step, "loss": losses[-1], "lr_muon": lr_muon if muon_opt else None, "lr_adamw": lr_adamw,
                    "momentum": momentum if muon_opt else None, "grad_norm": grad_norm.item(),
                    **step_speed(tokens_per_step, dt, flops_per_token, device, world_size),
                    "muon_ms": last_step_ms(muon_opt), "step_ms": dt * 1e3, "skipped_steps": skipped,
                    "tokens": step * tokens_per_step})
        t_log, step_log, history = time.time(), step, []
        if any_rank(bool(interrupted), device, world_size) and step < total_steps:
            save(step, val_loss)
            print0(f"interrupted: saved step {step} to {ckpt_path}; run again with --resume to continue")
            cleanup_distributed()
            sys.exit(EXIT_INTERRUPTED)

    print0(f"done: {total_steps} steps in {time.time() - t_start:.0f}s, val loss {val_loss:.4f}, "
           f"checkpoint {ckpt_path}")
    if (rank == 0 or args.fsdp) and args.sample_prompt:  # under FSDP every forward is collective
        raw_model.eval()
        idx = torch.tensor([[tok.bos_id] + tok.encode(args.sample_prompt)], device=device)
        n = min(48, config.max_seq_len - idx.size(1))
        if n > 0:
            with ctx:
                out = raw_model.generate(idx, n, temperature=0.8, top_k=40, eos_id=tok.eos_id)
            print0(f"sample: {tok.decode(out[0, 1:].tolist())!r}")
    logger.finish()
    cleanup_distributed()


if __name__ == "__main__":
    main()
