"""Generate text from a checkpoint, or chat with a fine-tuned one, printing tokens as they come.

    python sample.py --ckpt out/pretrain.pt --prompt "Mia lives in"      # continue plain text
    python sample.py --ckpt out/sft.pt --prompt "Tom has a red kite. What colour is Tom's kite?"
    python sample.py --ckpt out/dpo.pt --chat                             # talk; Ctrl-D or "exit" ends

A pretraining checkpoint (or a Hugging Face export of one) continues the prompt as plain text
after <|bos|>; an SFT or DPO checkpoint (or any checkpoint with --chat) gets the prompt as a user
turn in the chat template and replies until <|im_end|>. A prompt that leaves no room for a reply
is refused with a non-zero exit (in --chat, at the end of the conversation).
"""
import argparse
import os
import sys

import torch

from common import autocast, die, load_checkpoint, load_checkpoint_tokenizer
from data.chat import render_prompt
from data.prepare import bounded
from model import GPT, ModelConfig

DEFAULT_PROMPTS = {
    "text": "Mia lives in",
    "chat": "Story: Mia has a red kite. Tom has a blue drum.\n\nQuestion: What colour is Mia's kite?",
}


def device_name(text: str) -> str:
    """An argparse type: auto, or a device torch knows (cpu, cuda, cuda:1, ...)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/sft.pt", help="checkpoint of any stage")
    p.add_argument("--prompt", default=None, help="text to continue, or the user's message to a chat checkpoint")
    p.add_argument("--chat", action="store_true", help="interactive conversation (input() until EOF or exit)")
    p.add_argument("--max_new_tokens", type=bounded(int, 1), default=128,
                   help="at least 1; clamped to what fits in the context")
    p.add_argument("--temperature", type=bounded(float, 0), default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=bounded(int, 0), default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=bounded(int, 0, 2**64 - 1), default=1337)
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's own")
    return p.parse_args(argv)


def stream_text(model, tok, ids, args, eos_id, device, ctx):
    """Generate after `ids`, printing text as it comes; returns the generated ids (without eos), or
    None when `ids` fill the context and leave no room for one token.

    The whole generated list is decoded each time and only the new suffix printed: a character of
    several UTF-8 bytes can span tokens, and decoding token by token would print it broken. A
    trailing U+FFFD (an incomplete character) is held back until the next token completes it.
    """
    room = model.config.max_seq_len - len(ids)
    n = min(args.max_new_tokens, room)
    if n < 1:  # the caller refuses the prompt
        return None
    if n < args.max_new_tokens and not args.chat:
        print(f"[max_new_tokens clamped to {n}: prompt ({len(ids)} tokens) + reply must fit in max_seq_len="
              f"{model.config.max_seq_len}]", file=sys.stderr)
    out, shown = [], ""
    idx = torch.tensor([ids], device=device)
    with ctx:
        for t in model.stream(idx, n, temperature=args.temperature, top_k=args.top_k or None, eos_id=eos_id):
            if t.item() == eos_id:
                break
            out.append(t.item())
            text = tok.decode(out)
            if text.endswith("\ufffd"):
                continue
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(out)[len(shown):], flush=True)
    return out


def main():
    args = parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die("--device cuda was asked for but no CUDA GPU is available")
    device = torch.device(args.device)
    ctx = autocast(device, "bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)

    ckpt = load_checkpoint(args.ckpt)
    tok = load_checkpoint_tokenizer(ckpt, args.ckpt, os.path.dirname(args.ckpt), override=args.tokenizer)
    if ckpt.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        die(f"{args.ckpt} was trained with another tokenizer than {tok.name}; leave out --tokenizer")
    model = GPT(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    stage = ckpt.get("stage", "pretrain")
    chat = args.chat or stage != "pretrain"
    step = f", step {ckpt['step']}" if ckpt.get("step") is not None else ""
    print(f"[{args.ckpt}: {stage} checkpoint{step}, {model.num_params() / 1e6:.2f}M parameters]", file=sys.stderr)
    del ckpt

    if not args.chat:
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPTS["chat" if chat else "text"]
        # a fine-tuned model answers the prompt as a user turn
        ids = render_prompt(tok, [{"role": "user", "content": prompt}]) if chat else [tok.bos_id] + tok.encode(prompt)
        if len(ids) >= model.config.max_seq_len:
            die(f"--prompt is {len(ids)} tokens{' in the chat template' if chat else ''}, which leaves no room for a "
                f"reply in the context (max_seq_len={model.config.max_seq_len}); shorten it")
        if not chat:
            print(prompt, end="")
        stream_text(model, tok, ids, args, tok.im_end_id if chat else tok.eos_id, device, ctx)
        return

    if stage == "pretrain":
        print("[a pretraining checkpoint was never taught the chat format; expect odd replies]", file=sys.stderr)
    print(f"[chat: type a message; Ctrl-D, 'exit' or 'quit' ends. Replies stop at <|im_end|>, after "
          f"--max_new_tokens or at the context limit (max_seq_len={model.config.max_seq_len}); old turns are "
          f"dropped when the conversation outgrows it]", file=sys.stderr)
    messages, refused = [], 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            break
        if line in ("exit", "quit"):
            break
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = render_prompt(tok, messages)
        # forget the oldest turns while the conversation leaves too little room for a reply
        while len(ids) + 16 > model.config.max_seq_len and len(messages) > 1:
            messages = messages[2:]
            ids = render_prompt(tok, messages)
        reply = stream_text(model, tok, ids, args, tok.im_end_id, device, ctx)
        if reply is None:
            print(f"[the message has {len(ids)} tokens and fills the context (max_seq_len="
                  f"{model.config.max_seq_len}); shorten it]", file=sys.stderr)
            messages.pop()  # did not fit: forget it so the next message can
            refused += 1
            continue
        messages.append({"role": "assistant", "content": tok.decode(reply)})
    if refused:
        die(f"{refused} message(s) did not fit the context (max_seq_len={model.config.max_seq_len}) and got no "
            f"reply; shorten them")


if __name__ == "__main__":
    main()
