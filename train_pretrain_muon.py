"""Stage 1: next-token pretraining of the QK-norm transformer with Muon (matrices) + AdamW (the rest).

    python train_pretrain_muon.py                                   # CPU demo on the embedded corpus
    torchrun --nproc_per_node 8 train_pretrain_muon.py --hidden_size 768 --num_hidden_layers 12 ...

Reads top to bottom: config -> distributed init -> data -> model -> optimizers -> schedules ->
loop (forward, backward, accumulation, sync, clip, both optimizer steps) -> eval -> checkpoint.
"""
import math
import os
import resource
import signal
import time

import torch
import torch.distributed as dist

from common import (MetricsLogger, check_model_matches, cleanup_distributed, clip_grads,
                    die, format_eta, load_checkpoint, make_optimizers, peak_flops, print0, rng_state,
                    save_checkpoint, schedules, set_rng_state, setup_run, sync_grads, train_arg_parser)
from data.loaders import TokenWindowLoader, eval_batches
from data.prepare import ensure_prepared, prepare_files
from data.readers import DataError
from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig, split_params, split_summary

STAGE = "pretrain"
DEFAULT_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     max_seq_len=256)  # 3.2M parameters on the embedded corpus: a CPU demo in minutes
ROOT = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = os.path.join(ROOT, "data", "embedded")


def parse_args():
    p = train_arg_parser(__doc__)
    # stage defaults: a model and a run sized for a few minutes on a 2-core CPU
    # (the model shape stays None here: a --resume run takes its shape from the checkpoint)
    p.set_defaults(batch_size=16, max_steps=300, lr_muon=0.02, lr_adamw=5e-4, momentum=0.95,
                   warmup_steps=20, eval_interval=100)
    p.add_argument("--sample_prompt", default="Mia lives in", help="text continued at the end of the run")
    return p.parse_args()


def resolve_data(data_path, rank, world_size):
    """A prepared directory (meta.json, train.bin, val.bin, tokenizer.json); a raw .txt/.jsonl/.parquet
    file or folder is prepared once into data/prepared/<name>; nothing means the embedded corpus."""
    if data_path is None:
        out = EMBEDDED
    elif os.path.isdir(data_path) and os.path.exists(os.path.join(data_path, "meta.json")):
        return data_path
    elif os.path.exists(data_path):
        out = os.path.join(ROOT, "data", "prepared", os.path.splitext(os.path.basename(data_path.rstrip("/")))[0])
    else:
        raise DataError(f"--data_path {data_path}: no such file or directory")
    if rank == 0:
        if data_path is None:
            ensure_prepared(out)
        elif not os.path.exists(os.path.join(out, "meta.json")):
            print0(f"preparing {data_path} into {out} (first run only; for another vocabulary size run "
                   f"data/prepare.py yourself)...")
            prepare_files(out, pretrain_path=data_path)
    if world_size > 1:
        dist.barrier()
    return out


@torch.no_grad()
def evaluate(model, val_path, batch_size, args, rank, world_size, device, ctx):
    """Mean loss over a fixed set of val windows, averaged over ranks."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in eval_batches(val_path, batch_size, args.max_seq_len, args.eval_iters * world_size,
                             rank, world_size):
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
        count += 1
    model.train()
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        count *= world_size
    return (total / count).item()


def sync_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def main():
    args = parse_args()
    rank, world_size, device, ctx, use_compile = setup_run(args)

    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    # --init_from: continue pretraining from another run's weights, with fresh optimizers
    init = load_checkpoint(args.init_from) if args.init_from and ckpt is None else None
    for name, default in DEFAULT_SHAPE.items():  # flags given > the checkpoint's shape > defaults
        if getattr(args, name) is None:
            setattr(args, name, (ckpt or init)["model_config"][name] if (ckpt or init) else default)

    # ---------------------------------------------------------------- data
    try:
        data_dir = resolve_data(args.data_path, rank, world_size)
        tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
        train_loader = TokenWindowLoader(os.path.join(data_dir, "train.bin"), args.batch_size, args.max_seq_len,
                                         rank, world_size, seed=args.seed)
        val_path = os.path.join(data_dir, "val.bin")
        val_windows = (TokenWindowLoader(val_path, 1, args.max_seq_len).num_tokens - 1) // args.max_seq_len
        if val_windows < world_size:
            raise DataError(f"{val_path}: too short for one window of {args.max_seq_len} tokens per process")
        eval_batch_size = min(args.batch_size, val_windows // world_size)  # a small val set still evaluates
    except (DataError, FileNotFoundError) as e:
        die(str(e))
    tokens_per_step = args.batch_size * args.max_seq_len * args.accumulation_steps * world_size
    if args.max_steps:
        total_steps = args.max_steps
    elif args.epochs:
        total_steps = math.ceil(args.epochs * train_loader.num_tokens / tokens_per_step)
    else:
        die("set --max_steps or --epochs")
    print0(f"data: {data_dir} ({train_loader.num_tokens:,} train tokens, vocab {tok.vocab_size}); "
           f"{tokens_per_step:,} tokens per step, {total_steps} steps "
           f"({total_steps * tokens_per_step / train_loader.num_tokens:.2f} epochs)")

    # ---------------------------------------------------------------- model
    if init is not None:
        check_model_matches(init, args, tok.fingerprint, args.init_from)
    if ckpt is not None:
        check_model_matches(ckpt, args, tok.fingerprint, ckpt_path)
        if ckpt["args"]["optimizer"] != args.optimizer:
            die(f"{ckpt_path} was trained with --optimizer {ckpt['args']['optimizer']}; resume with the same")
    try:
        config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden_size,
                             num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                             num_key_value_heads=args.num_key_value_heads, max_seq_len=args.max_seq_len)
    except ValueError as e:
        die(str(e))
    raw_model = GPT(config).to(device)
    if ckpt is not None or init is not None:
        raw_model.load_state_dict((ckpt or init)["model"])
    del init
    # static shapes: the step-0 eval can use a smaller batch than training (a small val set), and
    # dynamo's automatic dynamic shapes then compiled the training graph with a symbolic batch size
    model = torch.compile(raw_model, dynamic=False) if use_compile else raw_model
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {config}")

    # ---------------------------------------------------------------- optimizers
    # The split: every matrix inside the transformer blocks goes to Muon; the embedding, the
    # (tied) head, all norm weights and anything 1-D go to AdamW. --optimizer adamw: all AdamW.
    muon_params, adamw_params = split_params(raw_model)
    print0(split_summary(raw_model, muon_params, adamw_params))
    if args.optimizer == "adamw":
        muon_params, adamw_params = [], muon_params + adamw_params
    muon_opt, adamw_opt = make_optimizers(muon_params, adamw_params, args, world_size, device)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "float16" else None
    step = 0
    if ckpt is not None:
        if muon_opt is not None:
            muon_opt.load_state_dict(ckpt["muon_opt"])
        adamw_opt.load_state_dict(ckpt["adamw_opt"])
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        step = ckpt["step"]
        print0(f"resumed {ckpt_path} at step {step} (saved by {ckpt['world_size']} process(es))")
    del ckpt

    def save(step, val_loss):
        # DistMuon.state_dict is collective: every rank gathers, rank 0 writes
        muon_state = muon_opt.state_dict() if muon_opt is not None else None
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "stage": STAGE, "step": step, "model": raw_model.state_dict(),
                "model_config": vars(config), "muon_opt": muon_state, "adamw_opt": adamw_opt.state_dict(),
                "data": train_loader.state_dict(), "rng": rng_state(device), "args": vars(args),
                "world_size": world_size, "val_loss": val_loss,
                "tokenizer_path": os.path.abspath(os.path.join(data_dir, "tokenizer.json")), "tokenizer_fingerprint": tok.fingerprint})

    # ---------------------------------------------------------------- loop
    # Ctrl-C or a scheduler's SIGTERM: save at the next logged step and exit; --resume continues exactly.
    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.append(True))
    logger = MetricsLogger(args, STAGE, rank, resume=args.resume)
    flops_per_token, peak = raw_model.flops_per_token(), peak_flops(device)

    def is_logged(step):  # the host waits for the GPU only on these steps
        return (step % args.log_interval == 0 or step == total_steps or step % args.eval_interval == 0
                or (args.save_interval and step % args.save_interval == 0))

    t_start, start_step, val_loss = time.time(), step, None
    t_log, step_log, losses = t_start, step, []
    while True:
        last = step == total_steps
        if step % args.eval_interval == 0 or last:
            val_loss = evaluate(model, val_path, eval_batch_size, args, rank, world_size, device, ctx)
            if not math.isfinite(val_loss):
                die(f"val loss is {val_loss} at step {step}; stopping (the last checkpoint is intact)")
            logger.log({"step": step, "val_loss": val_loss, "tokens": step * tokens_per_step},
                       f"step {step:5d} | val loss {val_loss:.4f}")
            if step > start_step:
                save(step, val_loss)
        elif args.save_interval and step % args.save_interval == 0:
            save(step, val_loss)
        if last:
            break

        lr_muon, lr_adamw, momentum = schedules(step, total_steps, args, muon_opt, adamw_opt)

        loss_sum = torch.zeros((), device=device)
        for _ in range(args.accumulation_steps):
            x, y = train_loader.next_batch()
            if device.type == "cuda":  # pinned memory lets the copy run without stalling the host
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx:
                _, loss = model(x, y)
            loss = loss / args.accumulation_steps
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        if world_size > 1:  # log the global batch's loss; every rank then agrees on a NaN too
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        losses.append(loss_sum)

        # gradients: AdamW's averaged over ranks here, Muon's inside DistMuon; then one global clip
        if scaler:
            scaler.unscale_(adamw_opt)
            if muon_opt is not None:
                scaler.unscale_(muon_opt)
        pending = sync_grads(adamw_params, world_size)
        if muon_opt is not None and world_size > 1:
            muon_opt.reduce_grads()  # launch Muon's reduce-scatter so it overlaps the all-reduce
        for work in pending:
            work.wait()
        # fp16 must see the norm now, to skip a step with an inf gradient; otherwise stay asynchronous
        grad_norm, clip_scale = clip_grads(muon_opt, muon_params, adamw_params, args.grad_clip, world_size,
                                           sync=scaler is not None)
        timed = muon_opt is not None and is_logged(step + 1)  # time the Muon step on logged steps only
        if not scaler or math.isfinite(grad_norm):
            t_muon = sync_time(device) if timed else 0.0
            if muon_opt is not None:
                muon_opt.step(grad_scale=clip_scale)
            muon_ms = (sync_time(device) - t_muon) * 1e3 if timed else None
            adamw_opt.step()
        if scaler:
            scaler.update()  # an inf/nan gradient (fp16 overflow) skipped both steps above
        if muon_opt is not None:
            muon_opt.zero_grad(set_to_none=True)
        adamw_opt.zero_grad(set_to_none=True)
        step += 1
        if not is_logged(step):
            continue

        # ---- logged step: look at the losses since the last one, log, maybe stop
        recent = torch.stack(losses).tolist()
        bad = [i for i, v in enumerate(recent) if not math.isfinite(v)]
        if bad:
            die(f"loss is {recent[bad[0]]} at step {step_log + bad[0]}; stopping (the last checkpoint in "
                f"{args.out_dir} is intact). Try a lower --lr_muon/--lr_adamw or --dtype bfloat16/float32.")
        dt = (time.time() - t_log) / (step - step_log)
        tok_per_s = tokens_per_step / dt
        mfu = flops_per_token * tok_per_s / (peak * world_size) if peak else None
        eta = (time.time() - t_start) / (step - start_step) * (total_steps - step)
        grad_norm = float(grad_norm)
        row = {"step": step, "loss": recent[-1], "lr_muon": lr_muon if muon_opt else None, "lr_adamw": lr_adamw,
               "momentum": momentum if muon_opt else None,
               "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu, "mem_gb": memory_gb(device),
               "muon_ms": muon_ms, "step_ms": dt * 1e3, "tokens": step * tokens_per_step,
               "elapsed_s": time.time() - t_start}
        logger.log(row, f"step {step:5d}/{total_steps} | loss {recent[-1]:.4f} | lr_muon {lr_muon:.2e} | "
                        f"lr_adamw {lr_adamw:.2e} | momentum {momentum:.3f} | grad norm {grad_norm:.3f} | "
                        f"{tok_per_s:,.0f} tok/s"
                        + (f" | MFU {mfu:.1%}" if mfu else "") + f" | mem {row['mem_gb']:.2f} GB"
                        + (f" | muon {muon_ms:.1f}/{dt * 1e3:.0f} ms" if muon_ms else "")
                        + f" | ETA {format_eta(eta)}")
        t_log, step_log, losses = time.time(), step, []

        stop = torch.tensor(float(bool(interrupted)), device=device)
        if world_size > 1:  # every rank must agree to stop at the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step < total_steps:
            save(step, val_loss)
            print0(f"interrupted: saved step {step} to {ckpt_path}; run again with --resume to continue")
            cleanup_distributed()
            return

    print0(f"done: {total_steps} steps in {time.time() - t_start:.0f}s, val loss {val_loss:.4f}, "
           f"checkpoint {ckpt_path}")
    if rank == 0 and args.sample_prompt:
        raw_model.eval()
        idx = torch.tensor([[tok.bos_id] + tok.encode(args.sample_prompt)], device=device)
        n = min(48, config.max_seq_len - idx.size(1))
        with ctx:
            out = raw_model.generate(idx, n, temperature=0.8, top_k=40, eos_id=tok.eos_id)
        print0(f"sample: {tok.decode(out[0, 1:].tolist())!r}")
    logger.finish()
    cleanup_distributed()


if __name__ == "__main__":
    main()
