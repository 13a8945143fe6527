"""Plumbing the three training scripts share: flags, distributed setup, interrupts, checkpoint
files, the run lock, and logging.

The algorithm of each stage (data, model, the Muon/AdamW split, both optimizers, both
schedules, the loop) lives in its own script; this file only holds what they would otherwise
repeat word for word.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from data.prepare import bounded
from hf_import import HFImportError, load_hf_checkpoint
from model import GPT, ModelConfig

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# A run stopped by Ctrl-C or SIGTERM saves its checkpoint and exits with this status (EX_TEMPFAIL:
# "try again"), so a scheduler can tell a pre-empted, resumable run from a finished one (0).
EXIT_INTERRUPTED = 75


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def die(msg: str):
    """Stop with one clear message and a non-zero exit (bad input, not a bug)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


def warn(msg: str):
    """A legal value that is surely not what the user meant: say so once, on rank 0, and go on."""
    print0(f"warning: {msg}")


# ------------------------------------------------------------------------------------ flags

def train_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every stage script has, under the same names. Flags whose value differs by stage
    (the batch, the step budget, the LRs and their schedules, the evaluation cadence) have no
    default here: each script sets its own with p.set_defaults, and --help shows it (%(default)s).
    Every number is checked at parse time: argparse names the flag and the allowed range."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Ctrl-C or SIGTERM saves the checkpoint and exits with status {EXIT_INTERRUPTED} "
                                       "(a second one stops at once); --resume continues exactly.")
    a = p.add_argument
    pos, nonneg, pos_f, nonneg_f = bounded(int, 1), bounded(int, 0), bounded(float, 0, above=True), bounded(float, 0)
    a("--data_path", default=None, help="data to train on (default: the embedded corpus, prepared on first use)")
    a("--out_dir", default="out", help="where checkpoints and metrics go (default: %(default)s)")
    a("--init_from", default=None,
      help="checkpoint (or Hugging Face Qwen3 directory) whose weights start this stage (default: the previous "
           "stage's checkpoint in --out_dir; none for pretraining)")
    a("--resume", action="store_true", help="continue this stage from <out_dir>/<stage>.pt exactly")
    # model shape: taken from the checkpoint a stage starts from (a given value must match it);
    # pretraining from scratch builds the shape its script sets
    shape = "(default: the checkpoint's, else the stage's own)"
    a("--hidden_size", type=pos, default=None, help=f"width of the residual stream {shape}")
    a("--num_hidden_layers", type=pos, default=None, help=f"transformer blocks {shape}")
    a("--num_attention_heads", type=pos, default=None, help=f"query heads {shape}")
    a("--num_key_value_heads", type=pos, default=None, help=f"key/value heads, dividing the query heads {shape}")
    a("--max_seq_len", type=bounded(int, 2), default=None, help=f"the model's context in tokens {shape}")
    a("--rope_theta", type=pos_f, default=None,
      help=f"RoPE's base: a larger one turns the slowest dimensions less over the context {shape}")
    a("--norm_weights", action=argparse.BooleanOptionalAction, default=None,
      help=f"RMSNorms with a learned gain (Qwen3's); --no-norm_weights: without, a faster backward {shape}")
    a("--tie_word_embeddings", action=argparse.BooleanOptionalAction, default=None,
      help=f"the LM head is the token embedding; --no-tie_word_embeddings: a head of its own {shape}")
    # batch and length of training
    a("--batch_size", type=pos, default=None, help="sequences per micro-batch per process (default: %(default)s)")
    a("--accumulation_steps", type=pos, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    a("--epochs", type=pos_f, default=None, help="passes over the training data (used when --max_steps is 0)")
    a("--max_steps", type=nonneg, default=None, help="optimizer steps (0: derive from --epochs; default: %(default)s)")
    # optimizers and schedules
    a("--optimizer", choices=["muon", "adamw"], default="muon",
      help="adamw: AdamW for every parameter, the baseline (default: %(default)s)")
    a("--lr_muon", type=pos_f, default=None, help="peak LR of Muon, matrices in the blocks (default: %(default)s)")
    a("--lr_adamw", type=pos_f, default=None,
      help="peak LR of AdamW: embedding, head, norms; every parameter with --optimizer adamw (default: %(default)s)")
    a("--momentum", type=bounded(float, 0, 1), default=None, help="Muon momentum after its warmup (default: %(default)s)")
    a("--momentum_start", type=bounded(float, 0, 1), default=0.85,
      help="Muon momentum at step 0 and after the cool-down (default: %(default)s)")
    a("--momentum_warmup_steps", type=nonneg, default=None,
      help="ramp Muon momentum from --momentum_start over these steps (0: off; default: %(default)s)")
    a("--momentum_cooldown_steps", type=nonneg, default=None,
      help="ramp it back to --momentum_start over the last steps (0: off; default: %(default)s)")
    a("--ns_coefficients", choices=["quintic", "polar_express"], default="quintic",
      help="Newton-Schulz polynomials (default: %(default)s)")
    a("--normuon", action=argparse.BooleanOptionalAction, default=False,
      help="NorMuon row/column normalisation (default: %(default)s)")
    a("--normuon_beta2", type=bounded(float, 0, 1), default=0.95,
      help="NorMuon's second-moment decay (default: %(default)s)")
    a("--cautious_wd", action=argparse.BooleanOptionalAction, default=False,
      help="Muon decays a weight only where its update has the same sign (default: %(default)s)")
    a("--adamw_beta1", type=bounded(float, 0, 1, below=True), default=0.9,
      help="AdamW's first-moment decay, every AdamW group (default: %(default)s)")
    a("--adamw_beta2", type=bounded(float, 0, 1, below=True), default=0.95,
      help="AdamW's second-moment decay, every AdamW group (default: %(default)s)")
    a("--weight_decay", type=nonneg_f, default=None,
      help="decoupled weight decay of both optimizers' matrices (default: %(default)s)")
    a("--warmup_steps", type=nonneg, default=None, help="linear LR warmup steps (default: %(default)s)")
    a("--min_lr_ratio", type=bounded(float, 0, 1), default=0.1,
      help="each LR schedule ends at this fraction of its peak (default: %(default)s)")
    a("--grad_clip", type=nonneg_f, default=1.0, help="clip the global gradient norm (0: off; default: %(default)s)")
    # hardware
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    a("--device", type=device_flag, default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda if present)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on CUDA)")
    a("--fsdp", action="store_true",
      help="shard weights, gradients and optimizer state over the torchrun processes (FSDP2), for models past "
           "one GPU's memory; Muon still orthogonalises whole matrices")
    a("--activation_checkpointing", action="store_true",
      help="recompute each block's activations in the backward: less memory, about a third more compute")
    # torch's generators take 64-bit seeds
    a("--seed", type=bounded(int, 0, 2**64 - 1), default=1337, help="data order and initialisation (default: %(default)s)")
    # logging and checkpoints
    a("--log_interval", type=pos, default=None, help="steps between logged rows (default: %(default)s)")
    a("--eval_interval", type=pos, default=None, help="steps between evaluations (default: %(default)s)")
    a("--eval_iters", type=pos, default=None, help="batches per evaluation (default: %(default)s)")
    a("--save_interval", type=nonneg, default=0, help="also save every N steps (0: only at evals and the end)")
    a("--use_wandb", action="store_true")
    a("--wandb_project", default="muon-minimal", help="(default: %(default)s)")
    return p


def device_flag(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (whether that GPU exists is checked at setup)."""
    kind, _, index = text.partition(":")
    if text not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def total_steps_of(args, steps_per_epoch: float) -> int:
    """--max_steps, or --epochs worth of steps; warns about a warmup or momentum ramp longer than the run."""
    if args.max_steps:
        total = args.max_steps
    elif args.epochs:
        total = max(1, math.ceil(args.epochs * steps_per_epoch))
    else:
        die("set --max_steps or --epochs")
    for flag in ("warmup_steps", "momentum_warmup_steps", "momentum_cooldown_steps"):
        if getattr(args, flag) > total:
            warn(f"--{flag} {getattr(args, flag)} is longer than the run ({total} steps)")
    return total


# ------------------------------------------------------------------------------ distributed

def setup_distributed(device_arg: str, fsdp: bool = False):
    """Returns (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU; one GPU per process.
    FSDP needs the process group even for one process."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {device_arg} was asked for but no CUDA GPU is available; use --device cpu")
    if device_arg.startswith("cuda:") and int(device_arg[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        die(f"--device {device_arg}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}; pick one of them "
            f"or --device cuda")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_arg)
    if fsdp and "LOCAL_RANK" not in os.environ:
        die("--fsdp shards the model over the processes torchrun starts: run it as "
            "`torchrun --nproc_per_node N SCRIPT --fsdp ...` (N = 1 works too)")
    if world_size > 1 or fsdp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def setup_run(args):
    """Distributed init, then the run-wide defaults every stage shares: bf16 autocast and
    torch.compile on CUDA, fp32 and eager on CPU, the seed, TF32 matmuls.
    Returns (rank, world_size, device, autocast context, use_compile); fills in args.dtype."""
    rank, world_size, device = setup_distributed(args.device, args.fsdp)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.fsdp and args.dtype == "float16":
        die("--fsdp runs in bfloat16 or float32: fp16's loss scaling is not supported on sharded gradients here; "
            "use --dtype bfloat16")
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, device, autocast(device, args.dtype), use_compile


def wrap_model(raw_model, args, use_compile: bool):
    """The model the loop calls: raw_model with each block's activations recomputed in the backward
    (--activation_checkpointing), sharded by FSDP2 (--fsdp: fully_shard on every block, then on the rest, so
    a block's weights are gathered only while it runs; parameters become DTensor row shards in place), and
    compiled with static shapes (an eval batch smaller than the training batch must not recompile the
    training graph with a symbolic batch size): the whole model, or under FSDP each block and the output.
    Split the parameters after this call."""
    raw_model.checkpoint_blocks = args.activation_checkpointing
    if not args.fsdp:
        return torch.compile(raw_model, dynamic=False) if use_compile else raw_model
    if use_compile:
        # FSDP2 gathers and frees weights in hooks around each block, which would break one whole-model graph
        # into pieces at every block: compile each block, and the output (norm, head, loss) alone, instead
        for block in raw_model.layers:
            block.compile(dynamic=False)
        raw_model.output = torch.compile(raw_model.output, dynamic=False)
    shard(raw_model)
    return raw_model


def shard(model):
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


def micro_steps(model, n: int):
    """range(n) for the gradient accumulation loop. Under FSDP every micro-step's backward reduce-scatters
    the gradients into their shards, so that between micro-steps each rank holds only its shard: FSDP's
    memory saving. With one process the shard is the whole gradient and the reduce-scatter a copy that saves
    nothing, so there the gradients accumulate whole and move into the shards once, after the last one."""
    defer = isinstance(model, FSDPModule) and dist.get_world_size() == 1
    for i in range(n):
        if defer:
            model.set_requires_gradient_sync(i == n - 1)
        yield i


def cleanup_distributed():
    if dist.is_initialized():
        gc.collect()  # drop finished async work handles (they hold tensors) while the interpreter is whole
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
        dist.destroy_process_group()


def catch_interrupts() -> list:
    """Ctrl-C or a scheduler's SIGTERM only append to the returned list; the loop reads it at its
    next logged step, saves, and exits with EXIT_INTERRUPTED. A second one stops the process at once
    (the last checkpoint is intact): the next logged step may never come, e.g. while torch.compile's
    workers, signalled with the process group, are gone."""
    interrupted = []

    def handler(sig, frame):
        if interrupted:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        interrupted.append(True)
        print(f"{signal.Signals(sig).name}: saving at the next logged step; send it again to stop now",
              file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return interrupted


def any_rank(flag: bool, device, world_size: int) -> bool:
    """True on every rank if it is true on any (all ranks must stop at the same step)."""
    t = torch.tensor(float(flag), device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path: str, ckpt: dict):
    """Atomic: write a temp file beside `path`, then rename over it, so a crash mid-save never
    destroys the previous checkpoint. A full disk or an unwritable path stops the run with one
    message and leaves the previous checkpoint as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = "the disk is full" if "No space left" in str(e) or getattr(e, "errno", None) == 28 else str(e)
        die(f"could not write checkpoint {path}: {reason}; the previous checkpoint, if any, is intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_KEYS = ("model", "model_config")
# model_config fields newer than some checkpoints, with the value those checkpoints' models had
LATER_MODEL_CONFIG_FIELDS = {"norm_weights": True}


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project (weights_only: nothing in it runs code), or a Hugging Face
    Qwen3 directory (hf_import reads it into the same form). Either way its model_config builds a
    model.py GPT whose state dict its weights fill exactly, with finite values (check_checkpoint_model)."""
    if os.path.isdir(path):
        try:
            return load_hf_checkpoint(path)
        except HFImportError as e:
            die(str(e))
    if not os.path.exists(path):
        die(f"checkpoint {path} does not exist; check the path (a stage writes <out_dir>/pretrain.pt, sft.pt or dpo.pt; "
            f"--init_from also takes a Hugging Face Qwen3 directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message suggests weights_only=False, which would run the file's code: never
        die(f"checkpoint {path} could not be read ({type(e).__name__}): a damaged file, or not a checkpoint "
            f"written by these scripts")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        die(f"{path} is not a checkpoint of these scripts (a {type(ckpt).__name__} without "
            f"{' and '.join(CHECKPOINT_KEYS)}); for bare weights use export_hf.py's format or --init_from a checkpoint")
    check_checkpoint_model(ckpt, path)
    return ckpt


def check_checkpoint_model(ckpt: dict, path: str):
    """Stop with one line unless ckpt's model_config is one this model.py builds (a field it lacks
    only if LATER_MODEL_CONFIG_FIELDS gives its value, which is then filled in) and ckpt's weights
    are exactly that model's, with finite values: a checkpoint of another version of these scripts,
    a damaged one, or one of a run that diverged."""
    cfg, state = ckpt["model_config"], ckpt["model"]
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        die(f"{path}: model_config or model is not a dict; not a checkpoint of these scripts")
    for name, value in LATER_MODEL_CONFIG_FIELDS.items():
        cfg.setdefault(name, value)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown, missing = sorted(cfg.keys() - fields), sorted(fields - cfg.keys())
    if unknown or missing:
        what = (f"fields {unknown} this model.py does not know" if unknown else "") + \
            (" and " if unknown and missing else "") + (f"no {missing}" if missing else "")
        die(f"{path}: its model_config has {what}: a checkpoint of another version of these scripts; "
            f"use the version that wrote it")
    try:
        config = ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        die(f"{path}: its model_config is not a model this model.py builds ({e})")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    missing, unknown = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    if missing or unknown:
        what = (f"lack {missing[:3]} ({len(missing)} missing)" if missing
                else f"have {unknown[:3]} ({len(unknown)} unknown)")
        die(f"{path}: its weights {what} for its model_config: a damaged checkpoint or one of another version")
    for name, shape in shapes.items():
        t = state[name]
        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape != shape:
            have = (f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if torch.is_tensor(t)
                    else type(t).__name__)
            die(f"{path}: {name} is {have}, but its model_config implies a float tensor of shape {tuple(shape)}: "
                f"a damaged checkpoint or one of another version")
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        die(f"{path}: weights {bad[:3]} hold NaN or inf ({len(bad)} such): the run that wrote it diverged; "
            f"use an earlier checkpoint or train again with lower learning rates")


STAGES = ("pretrain", "sft", "dpo")


def load_resume_checkpoint(path: str, stage: str) -> dict:
    """The checkpoint --resume continues: this stage's own <out_dir>/<stage>.pt. Called before the
    run touches out_dir, so a resume with nothing to resume creates nothing."""
    if not os.path.exists(path):
        out_dir = os.path.dirname(path) or "."
        others = [f"{s}.pt" for s in STAGES if s != stage and os.path.isfile(os.path.join(out_dir, f"{s}.pt"))]
        held = f" ({out_dir} holds {', '.join(others)}: a new {stage} run starts from a previous stage's)" if others else ""
        die(f"--resume: there is no {stage} checkpoint {path} to continue{held}; drop --resume to start a new run, "
            f"or point --out_dir at the run to continue")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != stage or "step" not in ckpt:
        die(f"{path} is a {ckpt.get('stage', 'foreign')!r} checkpoint, not {stage!r}: --resume continues this "
            f"stage's own checkpoint; start a new {stage} run with --init_from {path}")
    return ckpt


def flag_text(name: str, value) -> str:
    """How a flag with this value is written on the command line."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


def check_resume(ckpt: dict, path: str, args, total_steps: int, world_size: int):
    """The one place a --resume is checked against its checkpoint's run: what the run cannot change
    midway must be as saved, and the step budget must not be spent already.

    Fixed: the optimizer; the settings kept in the optimizers' state (load_state_dict puts the saved
    values back over the flags: weight decay, AdamW's betas and Muon's variant); the seed (the data order and the
    SFT/DPO validation split follow it); and the global batch (the step, the schedules, the data
    position and the logged token count are counted in steps of it). The learning rates, their
    schedules and the momentum are set every step from the flags, so a resume may change them."""
    missing = [k for k in ("args", "muon_opt", "adamw_opt", "data", "rng", "world_size") if k not in ckpt]
    if missing:
        die(f"{path} has no {missing}: a checkpoint of another version of these scripts cannot be resumed; "
            f"start a new {ckpt['stage']} run with --init_from {path}")
    saved = ckpt["args"]
    if saved["optimizer"] != args.optimizer:
        die(f"{path} was trained with --optimizer {saved['optimizer']}; resume with the same")
    fixed = ["seed", "weight_decay", "weight_decay_embedding", "adamw_beta1", "adamw_beta2"]
    if args.optimizer == "muon":
        fixed += ["ns_coefficients", "normuon", "cautious_wd"] + (["normuon_beta2"] if args.normuon else [])
    for name in fixed:
        if name in saved and saved[name] != getattr(args, name):
            die(f"--resume: {path} was trained with {flag_text(name, saved[name])}, this run has "
                f"{flag_text(name, getattr(args, name))}; resume with {flag_text(name, saved[name])} (or start a new "
                f"run from it with --init_from)")
    old = (saved["batch_size"], saved["accumulation_steps"], ckpt["world_size"])
    new = (args.batch_size, args.accumulation_steps, world_size)
    if old[0] * old[1] * old[2] != new[0] * new[1] * new[2]:
        die(f"--resume: {path} was trained with a global batch of {old[0] * old[1] * old[2]} (--batch_size {old[0]} x "
            f"--accumulation_steps {old[1]} x {old[2]} process(es)), this run has {new[0] * new[1] * new[2]} "
            f"(--batch_size {new[0]} x --accumulation_steps {new[1]} x {new[2]}); choose --batch_size and "
            f"--accumulation_steps whose product with the process count is {old[0] * old[1] * old[2]}")
    if ckpt["step"] > total_steps:
        die(f"{path} is at step {ckpt['step']}, past this run's {total_steps} steps; pass --max_steps above "
            f"{ckpt['step']} to train on")


def gathered(state):
    """A state dict (a model's or an optimizer's) with every FSDP shard (DTensor) gathered into a whole CPU
    tensor, so a checkpoint has one format whatever wrote it. Collective under FSDP: call it on every rank."""
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    return state.full_tensor().cpu() if isinstance(state, DTensor) else state


def load_optimizer_state(optimizer, state_dict):
    """optimizer.load_state_dict, then the whole state tensors of each FSDP-sharded parameter cut to its shard."""
    try:
        optimizer.load_state_dict(state_dict)
    except ValueError as e:  # other parameter groups: a checkpoint of another version of these scripts
        die(f"--resume: the checkpoint's optimizer state does not fit this script's optimizer ({e}); a checkpoint of "
            f"another version cannot be resumed: start a new run from it with --init_from")
    for p, state in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


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
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_seq_len",
                 "rope_theta", "norm_weights", "tie_word_embeddings"):
        want, have = getattr(args, name, None), cfg.get(name, True)  # checkpoints from before norm_weights had them
        if want is not None and want != have:
            die(f"{path} has {name}={have} but --{name} {want} was given; drop the flag or use a "
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


def synchronized_time(device) -> float:
    """time.time() once the device has run all the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def memory_gb(device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def lock_out_dir(out_dir: str, stage: str, rank: int):
    """Hold <out_dir>/.<stage>.lock for the life of the process, so a second run of the same stage
    into the same out_dir stops at once instead of interleaving metrics and checkpoints. The OS
    drops the lock when the process ends, even on kill -9."""
    if rank != 0:
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, f".{stage}.lock"), "w")
    except OSError as e:
        die(f"--out_dir {out_dir} cannot be used ({e.strerror}): it must be a directory, or a path one can be made at")
    try:
        if fcntl is not None:  # no fcntl (Windows): no lock
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"another {stage} run is using --out_dir {out_dir}; wait for it or pass another --out_dir")
    return f


# The console line of a logged row: each of these fields it has (and is not None), in this order.
CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"), ("val_loss", "val loss {:.4f}"), ("val_bpb", "val bpb {:.4f}"),
    ("pref_acc", "preference accuracy {:.1%}"), ("val_reward_acc", "reward accuracy {:.1%}"),
    ("answer_acc", "answer accuracy {:.1%}"), ("reward_acc", "reward acc {:.2f}"), ("reward_margin", "margin {:+.3f}"),
    ("chosen_reward", "chosen {:+.3f}"), ("rejected_reward", "rejected {:+.3f}"), ("lr_muon", "lr_muon {:.2e}"),
    ("lr_adamw", "lr_adamw {:.2e}"), ("momentum", "momentum {:.3f}"), ("grad_norm", "grad norm {:.3f}"),
    ("tok_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"), ("mem_gb", "mem {:.2f} GB"), ("muon_ms", "muon {:.1f} ms"),
    ("step_ms", "step {:.0f} ms"),
)


class MetricsLogger:
    """Rows to the console, to <out_dir>/<stage>_metrics.jsonl and, with --use_wandb, to W&B.
    A fresh run replaces the previous run's file at its first row, not before: a run that fails
    while starting leaves the old metrics in place. --resume appends. Training rows (those with a
    loss) get the run's elapsed seconds and, on the console, an ETA over steps (first, total)."""

    def __init__(self, args, stage: str, rank: int, resume: bool, steps: tuple[int, int]):
        self.rank, self.wandb, self.mode = rank, None, "a" if resume else "w"
        self.path = os.path.join(args.out_dir, f"{stage}_metrics.jsonl")
        self.first_step, self.total_steps = steps
        self.t_start = time.time()
        if rank == 0 and args.use_wandb:
            try:
                import wandb  # optional, and slow to import: only for --use_wandb
                self.wandb = wandb.init(project=args.wandb_project, name=f"{stage}-{time.strftime('%m%d-%H%M%S')}",
                                        config=vars(args))
            except ImportError:
                die("--use_wandb needs the wandb package: pip install wandb")
            except Exception as e:  # not logged in, no network: one message, not wandb's traceback
                die(f"--use_wandb: wandb could not start ({type(e).__name__}: {e}); run `wandb login`, or set "
                    f"WANDB_MODE=offline")

    def log(self, row: dict):
        if "loss" in row:
            row["elapsed_s"] = time.time() - self.t_start
        if self.rank != 0:
            return
        print(self.console_line(row), flush=True)
        with open(self.path, self.mode) as f:
            f.write(json.dumps(row) + "\n")
        self.mode = "a"
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def console_line(self, row: dict) -> str:
        step = row["step"]
        parts = [f"step {step:5d}/{self.total_steps}" if "loss" in row else f"step {step:5d}"]
        parts += [fmt.format(row[key]) for key, fmt in CONSOLE_FIELDS if row.get(key) is not None]
        if row.get("skipped_steps"):
            parts.append(f"{row['skipped_steps']} skipped (fp16 overflow)")
        if "loss" in row and step > self.first_step:
            parts.append(f"ETA {format_eta(row['elapsed_s'] / (step - self.first_step) * (self.total_steps - step))}")
        return " | ".join(parts)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def step_speed(tokens: float, seconds: float, flops_per_token: float, device, world_size: int) -> dict:
    """The speed fields of a logged row: tokens/s over the logged interval, MFU against the device's
    peak (None where unknown), peak memory so far, milliseconds per step is the caller's."""
    tok_per_s = tokens / seconds
    peak = peak_flops(device)
    return {"tok_per_s": tok_per_s, "mfu": flops_per_token * tok_per_s / (peak * world_size) if peak else None,
            "mem_gb": memory_gb(device)}


def stop_on_nan(losses: list, first_step: int, out_dir: str):
    """Stop at a NaN/inf training loss, naming its step (losses[i] is step first_step + i)."""
    if not all(map(math.isfinite, losses)):
        bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        die(f"loss is {losses[bad]} at step {first_step + bad}; stopping (the last checkpoint in {out_dir} "
            f"is intact). Try a lower --lr_muon/--lr_adamw or --dtype bfloat16/float32.")


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------ later stages: SFT, DPO, sample

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
    what = f"its tokenizer {recorded} does not exist" if recorded else "it records no tokenizer"
    die(f"{path}: {what}; pass the data directory it was prepared in as --data_path (or --tokenizer to "
        f"sample.py and export_hf.py)")

