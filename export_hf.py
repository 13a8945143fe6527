"""Export a checkpoint as a Hugging Face Qwen3ForCausalLM directory, and read one back.

`python export_hf.py --ckpt out/sft.pt --out_dir hf/sft` writes config.json, model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json (with our ChatML template);
load_hf_checkpoint(dir) turns such a directory into our checkpoint dict (--init_from DIR).
"""
import argparse
import json
import os
import shutil
import tempfile

import torch

from common import die, load_checkpoint, load_checkpoint_tokenizer
from data.tokenizer import BOS, BYTE_TO_UNICODE, EOS, IM_END, IM_START, PAD, load_tokenizer
from model import GPT, ModelConfig

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


def weight_names(num_layers: int, tied: bool) -> dict[str, str]:
    """Our state-dict name -> the Qwen3ForCausalLM name, for every weight the export writes.
    A tied head is the embedding, so it is not written (safetensors refuses shared tensors)."""
    block = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
             **{f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(num_layers):
        names.update({f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                      for ours, theirs in block.items()})
    if not tied:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ------------------------------------------------------------------------------------ export

def hf_config(cfg: dict, tok, stage: str, dtype: str) -> dict:
    # A chat model's turn ends at <|im_end|>, as in Qwen's own instruct configs.
    eos = tok.im_end_id if stage in ("sft", "dpo") else tok.eos_id
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


def tokenizer_config(tok, stage: str, max_seq_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END if stage in ("sft", "dpo") else EOS, "pad_token": PAD,
        "additional_special_tokens": [EOS, IM_START, IM_END],
        # encode(text) is our Tokenizer.encode: no bos or eos added (the chat template adds bos)
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
        "chat_template": CHAT_TEMPLATE,
    }


def hf_tensors(state: dict, cfg: dict, dtype: str) -> dict:
    names = weight_names(cfg["num_hidden_layers"], cfg["tie_word_embeddings"])
    if not cfg.get("norm_weights", True):
        # RMSNorm without a gain computes what Qwen3's RMSNorm does with a gain of ones
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        state = {**state, **{ours: torch.ones(head_dim if ours.endswith(("q_norm.weight", "k_norm.weight"))
                                              else cfg["hidden_size"])
                             for ours in names if ours.endswith("norm.weight")}}
    missing = [n for n in names if n not in state]
    if missing:
        die(f"checkpoint model weights lack {missing[:3]}: not a model.py GPT state dict")
    return {theirs: state[ours].to(DTYPES[dtype]).contiguous() for ours, theirs in names.items()}


def check_out_dir(out_dir: str, force: bool):
    if os.path.isfile(out_dir):
        die(f"--out_dir {out_dir} is a file; give a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        die(f"--out_dir {out_dir} exists and is not empty; pass --force to replace it")


def write_dir_atomically(out_dir: str, files: dict, tensors: dict):
    """Write everything into a temp directory beside out_dir, then swap it in with renames, so
    a failed export leaves no half-written model (and an old out_dir stays until the swap)."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp")
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, doc in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, ensure_ascii=False)
        old = f"{tmp}.old"
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(ckpt_path: str, out_dir: str, force: bool = False, dtype: str = "float32", tokenizer: str | None = None):
    check_out_dir(out_dir, force)
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or not {"model", "model_config"} <= ckpt.keys():
        die(f"{ckpt_path} has no model/model_config: not a checkpoint written by the training scripts")
    tok = load_checkpoint_tokenizer(ckpt, ckpt_path, os.path.dirname(ckpt_path), override=tokenizer)
    if ckpt.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        die(f"{ckpt_path} was trained with another tokenizer than {tok.name}; leave out --tokenizer")
    cfg, stage = ckpt["model_config"], ckpt.get("stage", "pretrain")
    if tok.vocab_size != cfg["vocab_size"]:
        die(f"{ckpt_path} has vocab_size={cfg['vocab_size']} but its tokenizer {tok.name} has {tok.vocab_size} tokens")
    tensors = hf_tensors(ckpt["model"], cfg, dtype)
    files = {
        "config.json": hf_config(cfg, tok, stage, dtype),
        "generation_config.json": generation_config(tok),
        "tokenizer.json": hf_tokenizer_json(tok),
        "tokenizer_config.json": tokenizer_config(tok, stage, cfg["max_seq_len"]),
    }
    write_dir_atomically(out_dir, files, tensors)
    print(f"wrote {out_dir}: Qwen3ForCausalLM ({stage} checkpoint, {dtype}), tokenizer and chat template")


# ------------------------------------------------------------------------------------ import

def read_json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        die(f"{path}: no {name} (a Hugging Face model directory has config.json, model.safetensors "
            f"and tokenizer.json)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        die(f"{file}: not valid json ({e})")


def model_config_from_hf(config: dict, path: str) -> dict:
    """Our ModelConfig fields from a Qwen3 config.json; anything our model cannot express stops
    with a message naming the field. Missing fields take Qwen3Config's defaults."""
    where = f"{path}/config.json"
    architectures = config.get("architectures") or ["Qwen3ForCausalLM"]
    if config.get("model_type") != "qwen3" or architectures != ["Qwen3ForCausalLM"]:
        die(f"{where}: model_type {config.get('model_type')!r}, architectures {config.get('architectures')}; "
            f"only a Qwen3ForCausalLM (model_type 'qwen3') can be imported")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(field), int):
            die(f"{where}: {field} is missing or not an integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    layer_types = config.get("layer_types") or []
    unsupported = {
        "head_dim": (config.get("head_dim", 128) != hidden / heads,
                     f"is {config.get('head_dim', 128)}, but our model's head_dim is hidden_size / "
                     f"num_attention_heads = {hidden / heads:g}"),
        "attention_bias": (bool(config.get("attention_bias")), "is true; our attention has no biases"),
        "hidden_act": (config.get("hidden_act", "silu") != "silu",
                       f"is {config.get('hidden_act')!r}; our MLP is SwiGLU (silu)"),
        "rope_scaling": (config.get("rope_scaling") is not None,
                         f"is {config.get('rope_scaling')}; our RoPE is unscaled"),
        "rope_parameters": (rope.get("rope_type", "default") != "default",
                            f"has rope_type {rope.get('rope_type')!r}; our RoPE is the default (unscaled) one"),
        "use_sliding_window": (bool(config.get("use_sliding_window")), "is true; our attention is full (causal)"),
        "layer_types": (any(t != "full_attention" for t in layer_types),
                        f"has {sorted(set(layer_types) - {'full_attention'})}; our attention is full in every layer"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            die(f"{where}: {field} {why}")
    fields = {
        "vocab_size": config["vocab_size"], "hidden_size": hidden, "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "intermediate_size": config["intermediate_size"],
        "max_seq_len": config.get("max_position_embeddings", 32768), "rope_theta": float(rope_theta),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)), "dropout": 0.0,
    }
    try:
        return vars(ModelConfig(**fields))
    except ValueError as e:
        die(f"{where}: {e}")


def read_hf_weights(path: str) -> dict:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(path, "model.safetensors.index.json")["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        die(f"{path}: no model.safetensors (nor model.safetensors.index.json); only safetensors weights are read")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(path, name)))
        except (SafetensorError, OSError) as e:
            die(f"{path}/{name}: could not be read ({e})")
    return tensors


def state_dict_from_hf(tensors: dict, model_config: dict, path: str) -> dict:
    """Our GPT state dict (float32, as training keeps it), each weight checked for its shape."""
    tied = model_config["tie_word_embeddings"]
    names = {theirs: ours for ours, theirs in weight_names(model_config["num_hidden_layers"], tied).items()}
    head = tensors.pop("lm_head.weight", None) if tied else None
    if head is not None and not torch.equal(head, tensors.get("model.embed_tokens.weight", head)):
        die(f"{path}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    missing, unexpected = names.keys() - tensors.keys(), tensors.keys() - names.keys()
    if missing:
        die(f"{path}: weights lack {sorted(missing)[:3]} ({len(missing)} missing)")
    if unexpected:
        die(f"{path}: weights {sorted(unexpected)[:3]} have no place in our model ({len(unexpected)} such)")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(ModelConfig(**model_config)).state_dict().items()}
    state = {}
    for theirs, ours in names.items():
        if tensors[theirs].shape != shapes[ours]:
            die(f"{path}: {theirs} has shape {tuple(tensors[theirs].shape)}, config.json implies "
                f"{tuple(shapes[ours])} (vocab_size, hidden_size, heads or intermediate_size mismatch)")
        state[ours] = tensors[theirs].to(torch.float32)
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # load_state_dict wants both names
    return state


def load_hf_checkpoint(path: str) -> dict:
    """A checkpoint dict like the training scripts save (model, model_config, tokenizer_path,
    tokenizer_fingerprint, stage "hf") from a Qwen3ForCausalLM directory with our tokenizer
    conventions (byte-level BPE with <|bos|>, <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>)."""
    if not os.path.isdir(path):
        die(f"{path} is not a directory")
    model_config = model_config_from_hf(read_json(path, "config.json"), path)
    tokenizer_path = os.path.join(os.path.abspath(path), "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        die(f"{path}: no tokenizer.json (training needs the model's tokenizer)")
    try:
        tok = load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError) as e:
        die(str(e))
    if tok.vocab_size != model_config["vocab_size"]:
        die(f"{path}: tokenizer.json has {tok.vocab_size} tokens but config.json vocab_size is "
            f"{model_config['vocab_size']}; they must match")
    state = state_dict_from_hf(read_hf_weights(path), model_config, path)
    return {"stage": "hf", "model": state, "model_config": model_config,
            "tokenizer_path": tokenizer_path, "tokenizer_fingerprint": tok.fingerprint}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of any stage, e.g. out/sft.pt")
    p.add_argument("--out_dir", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out_dir")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's own")
    args = p.parse_args()
    export(args.ckpt, args.out_dir, args.force, args.dtype, args.tokenizer)


if __name__ == "__main__":
    main()
