"""Chat data: ChatML rendering of a conversation into token ids and a loss mask, where a stage's
chat data's validation split, and answer accuracy, the evaluation of a chat model on it.

    <|bos|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ...

The mask is 1 exactly on assistant content and the <|im_end|> that closes it (the model must
learn to stop); bos, role headers, other turns and the newline after <|im_end|> are 0.
Bad input raises data.readers.DataError; the stage scripts turn it into one error line.
"""
import os

import torch
import torch.distributed as dist

from data.corpus import answer_is_correct
from data.readers import DataError, read_sft_jsonl

ROLES = ("system", "user", "assistant")


def _check_role(role) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: each message's role must be one of {', '.join(ROLES)}")


def render_conversation(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, mask = [tok.bos_id], [0]
    for msg in messages:
        role = msg["role"]
        _check_role(role)
        header = [tok.im_start_id] + tok.encode(f"{role}\n")
        body = tok.encode(msg["content"]) + [tok.im_end_id]
        tail = tok.encode("\n")
        train = 1 if role == "assistant" else 0
        ids += header + body + tail
        mask += [0] * len(header) + [train] * len(body) + [0] * len(tail)
    return ids, mask


def render_prompt(tok, messages: list[dict]) -> list[int]:
    """The conversation so far, then `<|im_start|>assistant\\n`; a trailing assistant turn
    (e.g. the reference answer of an eval example) is dropped. Generate until <|im_end|>."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("render_prompt needs messages that end with a user turn (or one assistant turn after it)")
    ids, _ = render_conversation(tok, messages)
    return ids + [tok.im_start_id] + tok.encode("assistant\n")


# ------------------------------------------------------------------------ the data of a chat stage

def split_val(records: list, seed: int, fraction: float = 0.02):
    """(train, val): about `fraction` of the records (at least one) held out, chosen by seed."""
    if len(records) < 2:
        raise DataError(f"{len(records)} record(s) cannot be split into train and val; add data or pass --val_path")
    n_val = max(1, round(fraction * len(records)))
    is_val = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in is_val],
            [r for i, r in enumerate(records) if i in is_val])


# ------------------------------------------------------------------------ answer accuracy

def answer_questions(eval_path: str | None, data_dir: str | None, tok, max_seq_len: int, n: int):
    """(questions, path, n_left_out): up to n held-out questions for answer_accuracy from an SFT-format
    jsonl whose records carry "answer" and "choices" keys: eval_path if given, else the data directory's
    sft_test.jsonl if there is one (the embedded corpus has it), else none. Questions whose prompt
    leaves no room for a reply within max_seq_len are left out, and counted."""
    path = eval_path or (data_dir and os.path.join(data_dir, "sft_test.jsonl"))
    if n <= 0 or not path or (eval_path is None and not os.path.exists(path)):
        return [], None, 0
    records = read_sft_jsonl(path)
    if not all("answer" in r and "choices" in r for r in records):
        raise DataError(f"{path}: answer accuracy needs every record to carry \"answer\" and \"choices\" keys "
                        f"(as data/embedded/sft_test.jsonl does)")
    fit = [r for r in records if len(render_prompt(tok, r["conversations"])) + 8 <= max_seq_len]
    return fit[:n], path, len(records) - len(fit)


@torch.no_grad()
def answer_accuracy(model, tok, questions: list[dict], device, ctx, rank: int = 0, world_size: int = 1,
                    max_new_tokens: int = 32):
    """Fraction of questions answered correctly by greedy generation: each record's conversation
    without its final assistant turn is the prompt, the reply runs to <|im_end|>, and
    data.corpus.answer_is_correct grades it against record["answer"] and record["choices"].
    Ranks take every world_size-th question; the counts are summed. Returns (accuracy, n).

    One question at a time: prompts differ in length and the model has no padding mask. Pass
    the uncompiled model (the KV cache changes shapes every token)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, asked
    for q in questions[rank::world_size]:
        prompt = render_prompt(tok, q["conversations"])
        room = min(max_new_tokens, model.config.max_seq_len - len(prompt))
        if room < 1:
            continue  # answer_questions leaves these out up front; never counted
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
