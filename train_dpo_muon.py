"""Stage 3: Direct Preference Optimization (DPO) of the fine-tuned model, Muon (matrices) + AdamW (the rest).

    python train_dpo_muon.py                                      # from out/sft.pt, embedded preference pairs
    python train_dpo_muon.py --data_path dpo.jsonl --init_from out/sft.pt --beta 0.1
    torchrun --nproc_per_node 8 train_dpo_muon.py --data_path dpo.jsonl

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy directly on preference pairs with
no reward model: for a prompt with a chosen and a rejected reply,
    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
where ref is a frozen copy of the starting model and log p(reply) sums the reply's token log-probs.
Reads top to bottom as the pretraining script does; only the batch, the loss and the evals differ.
Evaluation: held-out preference accuracy (how often the policy gives the chosen reply the higher
log-prob) and answer accuracy (greedy replies to held-out questions), at step 0 and at the end.
--data_path: a .jsonl file ({"chosen", "rejected"} message lists, or with a "prompt") or a prepared
directory (its dpo_{train,val}.jsonl and sft_test.jsonl).
"""
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (EXIT_INTERRUPTED, MetricsLogger, any_rank, bounded, catch_interrupts, check_model_matches,
                    check_resume, cleanup_distributed, die, gathered, load_checkpoint, load_checkpoint_tokenizer,
                    load_optimizer_state, load_resume_checkpoint, lock_out_dir, micro_steps, print0, rng_state,
                    save_checkpoint, set_rng_state, setup_run, shard, step_speed, stop_on_nan, total_steps_of,
                    train_arg_parser, warn, wrap_model)
from data.cache import resolve_chat_data
from data.chat import answer_accuracy, answer_questions, split_val
from data.loaders import DPOLoader, collate_dpo, encode_dpo
from data.readers import DataError, read_dpo_jsonl
from model import GPT, ModelConfig, split_params, split_summary
from muon import DistMuon, FSDPMuon, Muon, last_step_ms, step_optimizers

STAGE = "dpo"


def parse_args():
    p = train_arg_parser(__doc__)
    # stage defaults: few, small steps. Once the pairs are separated the DPO loss and its gradient
    # vanish, but Muon's orthogonalised step keeps its size (as does Adam's normalised one), so
    # further steps only drift the model. These LRs separate the held-out pairs of the embedded and
    # the English-task sets in 100 steps without costing answer accuracy (bench/LOG.md: three seeds).
    p.set_defaults(batch_size=16, max_steps=100, lr_muon=1e-3, lr_adamw=1e-4, momentum=0.85,
                   weight_decay=0.0, momentum_warmup_steps=0, momentum_cooldown_steps=0,
                   warmup_steps=10, eval_interval=100, eval_iters=32, log_interval=10)
    p.add_argument("--beta", type=bounded(float, 0, above=True), default=0.1,
                   help="strength of the pull toward the reference model (higher: stay closer)")
    p.add_argument("--val_path", default=None, help="DPO validation jsonl (default: 2%% of a --data_path file)")
    p.add_argument("--eval_path", default=None,
                   help="held-out questions with \"answer\"/\"choices\" keys for answer accuracy "
                        "(default: sft_test.jsonl of the data directory; none for a plain file)")
    p.add_argument("--eval_questions", type=bounded(int, 0), default=100, help="questions per answer-accuracy eval (0: off)")
    return p.parse_args()


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to min_lr_ratio * peak at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
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


def sequence_logps(logits, targets, loss_mask):
    """log p(response | prompt) per row: the SUM of the target tokens' log-probs where loss_mask is 1.

    Summed, not averaged over the response length: an average rewards a reply for being short
    (each extra token can only lower the sum but can raise a mean), and the DPO objective is
    defined on the probability of the whole reply. log_softmax runs in float32 whatever the
    autocast dtype, since the small differences between two replies are what DPO trains on.
    """
    logps = F.log_softmax(logits.float(), dim=-1)
    per_token = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # padding (-1) is masked out
    return (per_token * loss_mask).sum(dim=-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """(loss, chosen_rewards, rejected_rewards): loss is the batch mean of -log sigmoid(beta * margin),
    the implicit reward of a reply is beta * (log pi - log ref) (rewards are detached, for logging)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logps(model, x, y, mask):
    """One forward over (2B, T) rows -> (chosen logps (B,), rejected logps (B,))."""
    logits, _ = model(x)
    logps = sequence_logps(logits, y, mask)
    return logps.chunk(2)


@torch.no_grad()
def evaluate(model, ref_model, val_encoded, args, rank, world_size, device, ctx, pad_id):
    """Over the first eval_iters * batch_size val pairs (batches dealt to ranks): DPO loss, reward
    accuracy (relative to ref) and preference accuracy (the policy alone: logp chosen > rejected)."""
    model.eval()
    totals = torch.zeros(4, device=device)  # loss * pairs, reward wins, preference wins, pairs
    n = min(len(val_encoded), args.eval_iters * args.batch_size)
    for b, start in enumerate(range(0, n, args.batch_size)):
        if b % world_size != rank:
            continue
        x, y, mask = (t.to(device) for t in collate_dpo(val_encoded[start:start + args.batch_size], pad_id))
        with ctx:
            chosen, rejected = pair_logps(model, x, y, mask)
            ref_chosen, ref_rejected = pair_logps(ref_model, x, y, mask)
        loss, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta)
        pairs = chosen.numel()
        totals += torch.stack([loss * pairs, (cr > rr).sum().float(), (chosen > rejected).sum().float(),
                               torch.tensor(float(pairs), device=device)])
    model.train()
    if world_size > 1:
        dist.all_reduce(totals)
    loss, reward_wins, pref_wins, pairs = totals.tolist()
    return {"val_loss": loss / pairs, "val_reward_acc": reward_wins / pairs, "pref_acc": pref_wins / pairs}


def main():
    args = parse_args()
    rank, world_size, device, ctx, use_compile = setup_run(args)
    # --init_from gives the starting weights (which also become the frozen reference), the shape
    # and the tokenizer; --resume takes the policy, optimizers, data position and RNG from this
    # stage's checkpoint, and the reference again from the --init_from that run started from.
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")
    ckpt = load_resume_checkpoint(ckpt_path, STAGE) if args.resume else None
    lock = lock_out_dir(args.out_dir, STAGE, rank)  # noqa: F841 (held until exit)
    args.init_from = args.init_from or os.path.join(args.out_dir, "sft.pt")
    init = load_checkpoint(args.init_from)
    if ckpt is None:
        ckpt = init
    start_path = ckpt_path if args.resume else args.init_from
    try:
        train_file, val_file, data_dir = resolve_chat_data(STAGE, args.data_path, rank, world_size)
    except DataError as e:
        die(str(e))
    tok = load_checkpoint_tokenizer(ckpt, start_path, data_dir)
    check_model_matches(ckpt, args, tok.fingerprint, start_path)
    config = ModelConfig(**ckpt["model_config"])

    # ---------------------------------------------------------------- data
    try:
        train_records = read_dpo_jsonl(train_file)
        if args.val_path or val_file:
            val_records = read_dpo_jsonl(args.val_path or val_file)
        else:
            train_records, val_records = split_val(train_records, args.seed)
        train_encoded, cut = encode_dpo(tok, train_records, config.max_seq_len, train_file)
        val_encoded, _ = encode_dpo(tok, val_records, config.max_seq_len, args.val_path or val_file or "the val pairs")
        train_loader = DPOLoader(train_encoded, args.batch_size, rank, world_size, seed=args.seed, pad_id=tok.pad_id)
        questions, eval_path, left_out = answer_questions(args.eval_path, data_dir, tok, config.max_seq_len,
                                                          args.eval_questions)
    except DataError as e:
        die(str(e))
    # such pairs are dropped: their loss stays at ln 2 with zero gradient
    if cut["identical"]:
        warn(f"{cut['identical']:,} of {len(train_records):,} pairs have identical chosen and rejected replies: "
             f"dropped, since their loss stays at ln 2 with zero gradient")
    if cut["identical_cut"]:
        warn(f"{cut['identical_cut']:,} of {len(train_records):,} pairs differ only after max_seq_len="
             f"{config.max_seq_len} tokens: dropped, since cut there their loss stays at ln 2 with zero gradient; "
             f"shorten them, or start from a model pretrained with a longer context")
    print0(f"data: {train_file}: {len(train_records):,} pairs, {cut['truncated']:,} longer than max_seq_len="
           f"{config.max_seq_len} (truncated; {cut['no_reply']:,} of them dropped: a reply lost all its tokens); "
           f"{len(train_encoded):,} pairs kept, {len(val_encoded):,} val pairs")
    total_steps = total_steps_of(args, train_loader.batches_per_epoch / args.accumulation_steps)
    if args.resume:
        check_resume(ckpt, ckpt_path, args, total_steps, world_size)
        if os.path.abspath(ckpt.get("init_from") or "") != os.path.abspath(args.init_from):
            die(f"{ckpt_path} was trained against the reference --init_from {ckpt.get('init_from')}, not "
                f"{args.init_from}; resume with the same --init_from (the reference must not change mid-run)")
        if init["model_config"] != ckpt["model_config"]:
            die(f"{ckpt_path} and --init_from {args.init_from} have different model shapes; resume with the "
                f"--init_from this run started from")
    pairs_per_step = args.batch_size * args.accumulation_steps * world_size
    print0(f"{pairs_per_step} pairs per step, {total_steps} steps "
           f"({total_steps * pairs_per_step / len(train_encoded):.2f} epochs), beta {args.beta}; "
           + (f"answer accuracy on {len(questions)} questions from {eval_path}" if questions
              else "no answer accuracy (no --eval_path)")
           + (f" ({left_out} more leave no room for a reply within max_seq_len={config.max_seq_len}: left out)"
              if left_out else ""))

    # ---------------------------------------------------------------- models: policy and frozen reference
    raw_model = GPT(config).to(device)
    raw_model.load_state_dict(ckpt["model"])
    model = wrap_model(raw_model, args, use_compile)  # checkpointing, FSDP2 and compile as the flags say
    ref_model = GPT(config).to(device)
    ref_model.load_state_dict(init["model"])
    ref_model.requires_grad_(False).eval()  # never trained; eval() keeps any dropout off
    if args.fsdp:
        shard(ref_model)
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters from {start_path}, reference from "
           f"{args.init_from}, {config}")

    # ---------------------------------------------------------------- the split and the two optimizers
    # Every matrix inside the transformer blocks goes to Muon (DistMuon under torchrun); the
    # embedding, the (tied) head, all norm weights and anything 1-D go to AdamW, which decays only
    # its matrices. --optimizer adamw: AdamW for everything, the baseline. Fresh optimizer state:
    # SFT's momentum belongs to another objective.
    muon_params, adamw_params = split_params(raw_model)
    print0(split_summary(raw_model, muon_params, adamw_params))
    if args.optimizer == "adamw":
        muon_params, adamw_params = [], muon_params + adamw_params
    muon_opt = (FSDPMuon if args.fsdp else DistMuon if world_size > 1 else Muon)(
        muon_params, lr=args.lr_muon, momentum=args.momentum, weight_decay=args.weight_decay,
        ns_coefficients=args.ns_coefficients, normuon=args.normuon, beta2=args.normuon_beta2,
        cautious_wd=args.cautious_wd) if muon_params else None
    adamw_opt = torch.optim.AdamW([dict(params=[p for p in adamw_params if p.ndim >= 2], weight_decay=args.weight_decay),
                                   dict(params=[p for p in adamw_params if p.ndim < 2], weight_decay=0.0)],
                                  lr=args.lr_adamw, betas=(args.adamw_beta1, args.adamw_beta2), eps=1e-8,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")  # fp16 only: else a no-op
    step, skipped = 0, 0
    if args.resume:
        if muon_opt is not None:
            muon_opt.load_state_dict(ckpt["muon_opt"])
        load_optimizer_state(adamw_opt, ckpt["adamw_opt"])
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
        print0(f"resumed {ckpt_path} at step {step} (saved by {ckpt['world_size']} process(es))")
    metrics = {k: ckpt[k] for k in ("val_loss", "val_reward_acc", "pref_acc", "answer_acc")
               if args.resume and k in ckpt}
    val_step = ckpt.get("val_step") if args.resume else None  # the step of those metrics, logged by that run
    del ckpt, init

    def save(step, metrics):
        # collective: DistMuon gathers its state, FSDP its shards, on every rank; rank 0 writes
        muon_state = muon_opt.state_dict() if muon_opt is not None else None
        model_state, adamw_state = gathered(raw_model.state_dict()), gathered(adamw_opt.state_dict())
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "stage": STAGE, "step": step, "model": model_state,
                "model_config": vars(config), "muon_opt": muon_state, "adamw_opt": adamw_state,
                "scaler": scaler.state_dict(), "skipped_steps": skipped,
                "data": train_loader.state_dict(), "rng": rng_state(device), "args": vars(args),
                "world_size": world_size, "init_from": args.init_from, "tokenizer_path": tok.name,
                "tokenizer_fingerprint": tok.fingerprint, "val_step": val_step, **metrics})

    # ---------------------------------------------------------------- loop
    # evaluation deals batches and questions to ranks (rank, world_size); under FSDP every forward is
    # collective, so every rank evaluates everything
    eval_ranks = (0, 1) if args.fsdp else (rank, world_size)
    interrupted = catch_interrupts()  # Ctrl-C or SIGTERM: save at the next logged step, exit
    logger = MetricsLogger(args, STAGE, rank, resume=args.resume, steps=(step, total_steps))
    flops_per_token = raw_model.flops_per_token()

    def is_logged(step):  # the host waits for the GPU only on these steps
        return (step % args.log_interval == 0 or step == total_steps or step % args.eval_interval == 0
                or (args.save_interval and step % args.save_interval == 0))

    t_start, start_step = time.time(), step
    t_log, step_log, history = t_start, step, []
    while True:
        last = step >= total_steps
        if (step % args.eval_interval == 0 or last) and step != val_step:  # a resumed step has its row
            metrics, val_step = evaluate(model, ref_model, val_encoded, args, *eval_ranks, device, ctx, tok.pad_id), step
            if not math.isfinite(metrics["val_loss"]):
                die(f"val loss is {metrics['val_loss']} at step {step}; stopping (the last checkpoint is intact)")
            if questions:
                metrics["answer_acc"], _ = answer_accuracy(raw_model, tok, questions, device, ctx, *eval_ranks)
            logger.log({"step": step, **metrics})
            if step > start_step:
                save(step, metrics)
        elif args.save_interval and step % args.save_interval == 0 and step > start_step:
            save(step, metrics)
        if last:
            break

        # the two schedules: each optimizer its own warmup + cosine, and Muon's momentum
        lr_muon = cosine_lr(step, total_steps, args.lr_muon, args.warmup_steps, args.min_lr_ratio)
        lr_adamw = cosine_lr(step, total_steps, args.lr_adamw, args.warmup_steps, args.min_lr_ratio)
        momentum = muon_momentum(step, total_steps, args)
        for group in muon_opt.param_groups if muon_opt is not None else []:
            group["lr"], group["momentum"] = lr_muon, momentum
        for group in adamw_opt.param_groups:
            group["lr"] = lr_adamw

        # forward and backward over accumulation_steps micro-batches
        # loss, reward accuracy, margin, chosen and rejected rewards (means), non-padding tokens (all ranks)
        stats = torch.zeros(6, device=device)
        for _ in micro_steps(model, args.accumulation_steps):
            x, y, mask = train_loader.next_batch()  # (2B, T): rows [0:B] chosen, [B:2B] rejected
            if device.type == "cuda":  # pinned memory lets the copy run without stalling the host
                x, y, mask = x.pin_memory(), y.pin_memory(), mask.pin_memory()
            x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
            with ctx:
                with torch.no_grad():
                    ref_chosen, ref_rejected = pair_logps(ref_model, x, y, mask)
                chosen, rejected = pair_logps(model, x, y, mask)
            loss, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta)
            loss = loss / args.accumulation_steps
            scaler.scale(loss).backward()
            stats += torch.stack([loss.detach(), (cr > rr).float().mean() / args.accumulation_steps,
                                  (cr - rr).mean() / args.accumulation_steps, cr.mean() / args.accumulation_steps,
                                  rr.mean() / args.accumulation_steps, (y != -1).sum() * world_size])
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
        tokens = torch.stack(history)[:, -1].sum().item()  # non-padding tokens of the interval
        reward_acc, margin, chosen_reward, rejected_reward = history[-1][1:5].tolist()
        # the policy's forward + backward, plus the reference's forward (a third of that)
        logger.log({"step": step, "loss": losses[-1], "reward_acc": reward_acc, "reward_margin": margin,
                    "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                    "lr_muon": lr_muon if muon_opt else None, "lr_adamw": lr_adamw,
                    "momentum": momentum if muon_opt else None, "grad_norm": grad_norm.item(),
                    **step_speed(tokens, dt * (step - step_log), 4 / 3 * flops_per_token, device, world_size),
                    "muon_ms": last_step_ms(muon_opt), "step_ms": dt * 1e3, "skipped_steps": skipped,
                    "pairs": step * pairs_per_step})
        t_log, step_log, history = time.time(), step, []
        if any_rank(bool(interrupted), device, world_size) and step < total_steps:
            save(step, metrics)
            print0(f"interrupted: saved step {step} to {ckpt_path}; run again with --resume to continue")
            cleanup_distributed()
            sys.exit(EXIT_INTERRUPTED)

    print0(f"done: {total_steps} steps in {time.time() - t_start:.0f}s, preference accuracy "
           f"{metrics['pref_acc']:.1%}" + (f", answer accuracy {metrics['answer_acc']:.1%}" if "answer_acc" in metrics
                                           else "") + f", checkpoint {ckpt_path}")
    logger.finish()
    cleanup_distributed()


if __name__ == "__main__":
    main()
