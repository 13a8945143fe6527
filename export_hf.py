"""Export a checkpoint as a Hugging Face Qwen3ForCausalLM directory.

`python export_hf.py --ckpt out/sft.pt --out_dir hf/sft` writes config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json (with our ChatML template when the
checkpoint is a chat model) and export_hf.json (the stage and the files written). hf_import.py
reads such a directory back (--init_from DIR). An export replaces only an earlier export.
"""
import argparse
import json
import os
import shutil
import tempfile

import torch

from common import die, load_checkpoint, load_checkpoint_tokenizer
from data.tokenizer import BOS, BYTE_TO_UNICODE, EOS, IM_END, IM_START, PAD
from hf_import import EXPORT_MARKER, weight_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# data.chat.render_conversation / render_prompt as Jinja: bos, then one ChatML turn per message.
# Role header, content and the newline after <|im_end|> are tokenized together here but separately
# there; the tokens agree unless a message's content starts with a line break.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_config(cfg: dict, tok, chat: bool, dtype: str) -> dict:
    # A chat model's turn ends at <|im_end|>, as in Qwen's own instruct configs.
    eos = tok.im_end_id if chat else tok.eos_id
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"], "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"], "num_key_value_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "max_position_embeddings": cfg["max_seq_len"],
        # rope_theta/rope_scaling for transformers 4.x and vLLM, rope_parameters for transformers 5
        "rope_theta": float(cfg["rope_theta"]), "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        "rms_norm_eps": cfg["rms_norm_eps"], "tie_word_embeddings": cfg["tie_word_embeddings"],
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg["num_hidden_layers"],
        "layer_types": ["full_attention"] * cfg["num_hidden_layers"],
        "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
    }


def generation_config(tok) -> dict:
    # Both end markers, so generation stops after a chat turn and at the end of a document.
    return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.im_end_id, tok.eos_id], "pad_token_id": tok.pad_id}


def byte_level(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, ordered by the rank of the token they make.
    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so with this
    order (and ignore_merges: a whole piece in the vocabulary is taken as it is, as tiktoken
    does) Hugging Face's BPE picks the same merges."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(byte_level(left), byte_level(right)) for *_, left, right in merges]


def hf_tokenizer_json(tok) -> dict:
    """tokenizer.json of a byte-level BPE that encodes and decodes exactly as `tok` does."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = tok.enc._mergeable_ranks
    hf = Tokenizer(BPE({byte_level(b): r for b, r in ranks.items()}, bpe_merges(ranks), ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    doc = json.loads(hf.to_str())
    # Written by hand rather than add_special_tokens, which would renumber them.
    doc["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}
                           for s, i in sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])]
    return doc


def tokenizer_config(tok, chat: bool, max_seq_len: int) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END if chat else EOS, "pad_token": PAD,
        "additional_special_tokens": [EOS, IM_START, IM_END],
        # encode(text) is our Tokenizer.encode: no bos or eos added (the chat template adds bos)
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
    }
    # A pretrained model was never taught the turns: with a template, chat front ends would wrap its prompts in them.
    return {**config, "chat_template": CHAT_TEMPLATE} if chat else config


def hf_tensors(state: dict, cfg: dict, dtype: str, ckpt_path: str) -> dict:
    """The weights under their Qwen3 names, in `dtype`; load_checkpoint has checked that `state`
    is exactly the GPT state dict of `cfg`, with finite values."""
    names = weight_names(cfg["num_hidden_layers"], cfg["tie_word_embeddings"])
    if not cfg["norm_weights"]:
        # RMSNorm without a gain computes what Qwen3's RMSNorm does with a gain of ones
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        state = {**state, **{ours: torch.ones(head_dim if ours.endswith(("q_norm.weight", "k_norm.weight"))
                                              else cfg["hidden_size"])
                             for ours in names if ours.endswith("norm.weight")}}
    tensors = {theirs: state[ours].to(DTYPES[dtype]).contiguous() for ours, theirs in names.items()}
    overflow = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if overflow:
        die(f"{ckpt_path}: {overflow[0]} has values beyond {dtype}'s range ({len(overflow)} such weights); "
            f"export with --dtype bfloat16 or float32")
    return tensors


def earlier_export_files(out_dir: str) -> set[str] | None:
    """The file names the export in out_dir wrote, as its EXPORT_MARKER lists them; None if out_dir
    holds no readable marker (it is not an export)."""
    try:
        with open(os.path.join(out_dir, EXPORT_MARKER), encoding="utf-8") as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) if isinstance(files, list) and all(isinstance(n, str) for n in files) else None


def check_out_dir(out_dir: str, force: bool):
    """out_dir may be absent, empty, or (with force) an earlier export and nothing else: the export
    replaces the whole directory, so anything else in it, such as a training run's checkpoints, would be lost."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir {out_dir} is a file; give a directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return
    written = earlier_export_files(out_dir) or set()
    foreign = [e for e in entries if e not in written]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        die(f"--out_dir {out_dir} holds {', '.join(foreign[:3])}{more}, which no earlier export lists in its "
            f"{EXPORT_MARKER}; an export replaces its whole directory, so give a new or empty --out_dir")
    if not force:
        die(f"--out_dir {out_dir} holds an earlier export; pass --force to replace it")


def write_dir_atomically(out_dir: str, files: dict, tensors: dict):
    """Write everything into a temp directory beside out_dir, then swap it in with renames, so
    a failed export leaves no half-written model (and an old out_dir stays until the swap)."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp")
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, doc in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, ensure_ascii=False)
        old = f"{tmp}.old"
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if os.path.exists(old):
                os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        reason = "the disk is full" if e.errno == 28 else e.strerror or str(e)
        die(f"could not write --out_dir {out_dir}: {reason}; nothing there was changed")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def export(ckpt_path: str, out_dir: str, force: bool = False, dtype: str = "float32", tokenizer: str | None = None):
    check_out_dir(out_dir, force)
    ckpt = load_checkpoint(ckpt_path)  # its config, weights' shapes and finite values checked
    tok = load_checkpoint_tokenizer(ckpt, ckpt_path, os.path.dirname(ckpt_path), override=tokenizer)
    if ckpt.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        die(f"{ckpt_path} was trained with another tokenizer than {tok.name}; leave out --tokenizer")
    cfg, stage = ckpt["model_config"], ckpt.get("stage", "pretrain")
    if tok.vocab_size != cfg["vocab_size"]:
        die(f"{ckpt_path} has vocab_size={cfg['vocab_size']} but its tokenizer {tok.name} has {tok.vocab_size} tokens")
    chat = stage != "pretrain"
    tensors = hf_tensors(ckpt["model"], cfg, dtype, ckpt_path)
    files = {
        "config.json": hf_config(cfg, tok, chat, dtype),
        "generation_config.json": generation_config(tok),
        "tokenizer.json": hf_tokenizer_json(tok),
        "tokenizer_config.json": tokenizer_config(tok, chat, cfg["max_seq_len"]),
    }
    files[EXPORT_MARKER] = {"stage": stage, "step": ckpt.get("step"), "checkpoint": os.path.abspath(ckpt_path),
                            "files": sorted([*files, EXPORT_MARKER, "model.safetensors"])}
    write_dir_atomically(out_dir, files, tensors)
    print(f"wrote {out_dir}: Qwen3ForCausalLM ({stage} checkpoint, {dtype}), tokenizer"
          f"{' and chat template' if chat else ' (plain text: no chat template)'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of any stage, e.g. out/sft.pt")
    p.add_argument("--out_dir", required=True, help="directory to write (absent, empty, or an earlier export)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out_dir")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's own")
    args = p.parse_args()
    export(args.ckpt, args.out_dir, args.force, args.dtype, args.tokenizer)


if __name__ == "__main__":
    main()
