"""ChatML rendering of a conversation into token ids and a loss mask.

    <|bos|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ...

The mask is 1 exactly on assistant content and the <|im_end|> that closes it (the model must
learn to stop); bos, role headers, other turns and the newline after <|im_end|> are 0.
"""
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
