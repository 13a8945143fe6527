"""Stage 3: Direct Preference Optimization (DPO) of the fine-tuned model, Muon (matrices) + AdamW (the rest).

    python train_dpo_muon.py                                      # from out/sft.pt, embedded preference pairs
    python train_dpo_muon.py --data_path dpo.jsonl --init_from out/sft.pt --beta 0.1
    torchrun --nproc_per_node 8 train_dpo_muon.py --data_path dpo.jsonl

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy directly on preference pairs with
no reward model: for a prompt with a chosen and a rejected reply,
    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
where ref is a frozen copy of the starting model and log p(reply) sums the reply's token log-probs.
Evaluation: held-out preference accuracy (how often the policy gives the chosen reply the higher
log-prob) and answer accuracy (greedy replies to held-out questions), at step 0 and at the end.
--data_path: a .jsonl file ({"chosen", "rejected"} message lists, or with a "prompt") or a prepared
directory (its dpo_{train,val}.jsonl and sft_test.jsonl).
"""
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (MetricsLogger, answer_accuracy, answer_questions, check_model_matches,
                    cleanup_distributed, clip_grads, die, format_eta, load_checkpoint,
                    load_checkpoint_tokenizer, make_optimizers, peak_flops, print0, resolve_chat_data,
                    rng_state, save_checkpoint, schedules, set_rng_state, setup_run, split_val,
                    sync_grads, train_arg_parser)
from data.loaders import DPOLoader, collate_dpo, encode_dpo
from data.readers import DataError, read_dpo_jsonl
from model import GPT, ModelConfig, split_params, split_summary

STAGE = "dpo"


def parse_args():
    p = train_arg_parser(__doc__)
    # stage defaults: few, small steps. Once the pairs are separated the DPO loss and its gradient
    # vanish, but Muon's orthogonalised step keeps its size (as does Adam's normalised one), so
    # further steps only drift the model: 200 steps at the old lr_muon 0.002 took answer accuracy
    # from 24% to 4% on a first version of the embedded pairs. A small Muon LR with a larger AdamW
    # one separates the held-out pairs in 100 steps for a few points of answer accuracy, which
    # every setting that separated them cost; sweep in README.
    p.set_defaults(batch_size=16, max_steps=100, lr_muon=0.0005, lr_adamw=1e-4, momentum=0.85,
                   warmup_steps=10, eval_interval=100, eval_iters=32, log_interval=10)
    p.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull toward the reference model (higher: stay closer)")
    p.add_argument("--val_path", default=None, help="DPO validation jsonl (default: 2%% of a --data_path file)")
    p.add_argument("--eval_path", default=None,
                   help="held-out questions with \"answer\"/\"choices\" keys for answer accuracy "
                        "(default: sft_test.jsonl of the data directory; none for a plain file)")
    p.add_argument("--eval_questions", type=int, default=100, help="questions per answer-accuracy eval (0: off)")
    return p.parse_args()


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

    # ---------------------------------------------------------------- starting point
    # --init_from gives the starting weights (which also become the frozen reference), the shape
    # and the tokenizer; --resume takes the policy, optimizers, data position and RNG from this
    # stage's checkpoint and re-reads the reference from --init_from.
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")
    args.init_from = args.init_from or os.path.join(args.out_dir, "sft.pt")
    init = load_checkpoint(args.init_from)
    ckpt = load_checkpoint(ckpt_path) if args.resume else init
    start_path = ckpt_path if args.resume else args.init_from
    train_file, val_file, data_dir = resolve_chat_data(STAGE, args.data_path, rank, world_size)
    tok = load_checkpoint_tokenizer(ckpt, start_path, data_dir)
    check_model_matches(ckpt, args, tok.fingerprint, start_path)
    if args.resume and ckpt["args"]["optimizer"] != args.optimizer:
        die(f"{ckpt_path} was trained with --optimizer {ckpt['args']['optimizer']}; resume with the same")
    if init["model_config"] != ckpt["model_config"]:
        die(f"{ckpt_path} and --init_from {args.init_from} have different model shapes; resume with the "
            f"--init_from this run started from")
    config = ModelConfig(**ckpt["model_config"])

    # ---------------------------------------------------------------- data
    try:
        train_records = read_dpo_jsonl(train_file)
        if args.val_path or val_file:
            val_records = read_dpo_jsonl(args.val_path or val_file)
        else:
            train_records, val_records = split_val(train_records, args.seed)
        train_encoded, n_cut = encode_dpo(tok, train_records, config.max_seq_len)
        val_encoded, _ = encode_dpo(tok, val_records, config.max_seq_len)
        train_loader = DPOLoader(train_encoded, args.batch_size, rank, world_size, seed=args.seed, pad_id=tok.pad_id)
    except DataError as e:
        die(str(e))
    print0(f"data: {train_file}: {len(train_records):,} pairs, {n_cut:,} longer than max_seq_len="
           f"{config.max_seq_len} (truncated; {len(train_records) - len(train_encoded):,} of them dropped: a "
           f"reply lost all its tokens); {len(val_encoded):,} val pairs")
    questions, eval_path = answer_questions(args.eval_path, data_dir, tok, config.max_seq_len,
                                            args.eval_questions)
    if args.max_steps:
        total_steps = args.max_steps
    elif args.epochs:
        total_steps = math.ceil(args.epochs * train_loader.batches_per_epoch / args.accumulation_steps)
    else:
        die("set --max_steps or --epochs")
    pairs_per_step = args.batch_size * args.accumulation_steps * world_size
    print0(f"{pairs_per_step} pairs per step, {total_steps} steps "
           f"({total_steps * pairs_per_step / len(train_encoded):.2f} epochs), beta {args.beta}; "
           + (f"answer accuracy on {len(questions)} questions from {eval_path}" if questions
              else "no answer accuracy (no --eval_path)"))

    # ---------------------------------------------------------------- models: policy and frozen reference
    raw_model = GPT(config).to(device)
    raw_model.load_state_dict(ckpt["model"])
    model = torch.compile(raw_model) if use_compile else raw_model
    ref_model = GPT(config).to(device)
    ref_model.load_state_dict(init["model"])
    ref_model.requires_grad_(False).eval()  # never trained; eval() keeps any dropout off
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters from {start_path}, reference from "
           f"{args.init_from}, {config}")

    # ---------------------------------------------------------------- optimizers
    # The split: every matrix inside the transformer blocks goes to Muon; the embedding, the
    # (tied) head, all norm weights and anything 1-D go to AdamW. --optimizer adamw: all AdamW.
    # Fresh optimizer state: SFT's momentum belongs to another objective.
    muon_params, adamw_params = split_params(raw_model)
    print0(split_summary(raw_model, muon_params, adamw_params))
    if args.optimizer == "adamw":
        muon_params, adamw_params = [], muon_params + adamw_params
    muon_opt, adamw_opt = make_optimizers(muon_params, adamw_params, args, world_size, device)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "float16" else None
    step = 0
    if args.resume:
        if muon_opt is not None:
            muon_opt.load_state_dict(ckpt["muon_opt"])
        adamw_opt.load_state_dict(ckpt["adamw_opt"])
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        step = ckpt["step"]
        print0(f"resumed {ckpt_path} at step {step} (saved by {ckpt['world_size']} process(es))")
    metrics = {k: ckpt[k] for k in ("val_loss", "val_reward_acc", "pref_acc", "answer_acc")
               if args.resume and k in ckpt}
    del ckpt, init

    def save(step, metrics):
        # DistMuon.state_dict is collective: every rank gathers, rank 0 writes
        muon_state = muon_opt.state_dict() if muon_opt is not None else None
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "stage": STAGE, "step": step, "model": raw_model.state_dict(),
                "model_config": vars(config), "muon_opt": muon_state, "adamw_opt": adamw_opt.state_dict(),
                "data": train_loader.state_dict(), "rng": rng_state(device), "args": vars(args),
                "world_size": world_size, "tokenizer_path": tok.name, "tokenizer_fingerprint": tok.fingerprint,
                "init_from": args.init_from, **metrics})

    # ---------------------------------------------------------------- loop
    # Ctrl-C or a scheduler's SIGTERM: finish the step, save, exit; --resume continues exactly.
    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.append(True))
    logger = MetricsLogger(args, STAGE, rank, resume=args.resume)
    flops_per_token, peak = raw_model.flops_per_token(), peak_flops(device)
    t_start, start_step = time.time(), step
    while True:
        last = step == total_steps
        if step % args.eval_interval == 0 or last:
            metrics = evaluate(model, ref_model, val_encoded, args, rank, world_size, device, ctx, tok.pad_id)
            console = (f"step {step:5d} | val loss {metrics['val_loss']:.4f} | preference accuracy "
                       f"{metrics['pref_acc']:.1%} | reward accuracy {metrics['val_reward_acc']:.1%}")
            if questions:
                metrics["answer_acc"], n = answer_accuracy(raw_model, tok, questions, device, ctx, rank, world_size)
                console += f" | answer accuracy {metrics['answer_acc']:.1%} of {n}"
            logger.log({"step": step, **metrics}, console)
            if step > start_step:
                save(step, metrics)
        elif args.save_interval and step % args.save_interval == 0:
            save(step, metrics)
        if last:
            break

        lr_muon, lr_adamw, momentum = schedules(step, total_steps, args, muon_opt, adamw_opt)

        t0 = time.time()
        # loss, reward accuracy, margin, chosen and rejected rewards (means), non-padding tokens (sum)
        sums = torch.zeros(6, device=device)
        for _ in range(args.accumulation_steps):
            x, y, mask = train_loader.next_batch()  # (2B, T): rows [0:B] chosen, [B:2B] rejected
            x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
            with ctx:
                with torch.no_grad():
                    ref_chosen, ref_rejected = pair_logps(ref_model, x, y, mask)
                chosen, rejected = pair_logps(model, x, y, mask)
            loss, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta)
            loss = loss / args.accumulation_steps
            (scaler.scale(loss) if scaler else loss).backward()
            sums += torch.stack([loss.detach() * args.accumulation_steps, (cr > rr).float().mean(), (cr - rr).mean(),
                                 cr.mean(), rr.mean(), (y != -1).sum().float()]) / args.accumulation_steps
        if world_size > 1:  # log the global batch's numbers; every rank then agrees on a NaN too
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        lossf, reward_acc, margin, chosen_reward, rejected_reward, n_tokens = sums.tolist()
        n_tokens *= args.accumulation_steps * world_size
        if not math.isfinite(lossf):
            die(f"loss is {lossf} at step {step}; stopping (the last checkpoint in {args.out_dir} is intact). "
                f"Try a lower --lr_muon/--lr_adamw or --dtype bfloat16/float32.")

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
        grad_norm, clip_scale = clip_grads(muon_opt, muon_params, adamw_params, args.grad_clip, world_size)
        if math.isfinite(grad_norm):
            if muon_opt is not None:
                muon_opt.step(grad_scale=clip_scale)
            adamw_opt.step()
        elif not scaler:
            die(f"gradient norm is {grad_norm} at step {step}; stopping (the last checkpoint is intact)")
        if scaler:
            scaler.update()  # an inf/nan gradient (fp16 overflow) skipped both steps above
        if muon_opt is not None:
            muon_opt.zero_grad(set_to_none=True)
        adamw_opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_interval == 0 or step == total_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            tok_per_s = n_tokens / dt  # non-padding tokens of all ranks
            # the policy's forward + backward, plus the reference's forward (a third of that)
            mfu = 4 / 3 * flops_per_token * tok_per_s / (peak * world_size) if peak else None
            eta = (time.time() - t_start) / (step - start_step) * (total_steps - step)
            row = {"step": step, "loss": lossf, "reward_acc": reward_acc, "reward_margin": margin,
                   "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                   "lr_muon": lr_muon if muon_opt else None, "lr_adamw": lr_adamw,
                   "momentum": momentum if muon_opt else None, "grad_norm": grad_norm,
                   "tok_per_s": tok_per_s, "mfu": mfu, "pairs": step * pairs_per_step,
                   "elapsed_s": time.time() - t_start}
            logger.log(row, f"step {step:5d}/{total_steps} | loss {lossf:.4f} | reward acc {reward_acc:.2f} | "
                            f"margin {margin:+.3f} (chosen {chosen_reward:+.3f}, rejected {rejected_reward:+.3f}) | "
                            f"lr_muon {lr_muon:.2e} | lr_adamw {lr_adamw:.2e} | momentum {momentum:.3f} | "
                            f"grad norm {grad_norm:.3f} | "
                            f"{tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                            + f" | ETA {format_eta(eta)}")

        stop = torch.tensor(float(bool(interrupted)), device=device)
        if world_size > 1:  # every rank must agree to stop at the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step < total_steps:
            save(step, metrics)
            print0(f"interrupted: saved step {step} to {ckpt_path}; run again with --resume to continue")
            cleanup_distributed()
            return

    print0(f"done: {total_steps} steps in {time.time() - t_start:.0f}s, preference accuracy "
           f"{metrics['pref_acc']:.1%}" + (f", answer accuracy {metrics['answer_acc']:.1%}" if "answer_acc" in metrics
                                           else "") + f", checkpoint {ckpt_path}")
    logger.finish()
    cleanup_distributed()


if __name__ == "__main__":
    main()
