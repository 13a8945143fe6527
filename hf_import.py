"""Read a Hugging Face Qwen3ForCausalLM directory into the checkpoint dict the training scripts
save, so `--init_from DIR`, sample.py and export_hf.py take such a directory as they take a .pt.

Every field of config.json is honoured or refused by name, and every weight is checked for its
name, shape, dtype and finite values. Bad input raises HFImportError, whose message names the file
and what to fix; callers turn it into a one-line error. export_hf.py writes such directories.
"""
import json
import math
import os

import torch

from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig

# export_hf.py's record of an export (the checkpoint's stage and every file it wrote): the stage
# says whether the model chats, and a later export replaces only a directory this file accounts for.
EXPORT_MARKER = "export_hf.json"
STAGES = ("pretrain", "sft", "dpo", "hf")

# Fields that describe the file or Hugging Face's runtime options, not the function the weights compute.
METADATA_FIELDS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "initializer_range", "use_cache"}
# Read only when use_sliding_window is true, which is refused.
SLIDING_WINDOW_FIELDS = {"sliding_window", "max_window_layers"}
MODEL_FIELDS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
    "attention_dropout", "hidden_act", "use_sliding_window", "layer_types",
    "bos_token_id", "eos_token_id", "pad_token_id",
}
# Weight dtypes whose values float32 holds as they are meant (a quantized model's int or float8
# weights need scales our model does not have).
READABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class HFImportError(ValueError):
    """A directory that cannot become our model; the message alone tells the user what to fix."""


def weight_names(num_layers: int, tied: bool) -> dict[str, str]:
    """Our state-dict name -> the Qwen3ForCausalLM name, for every weight of the model.
    A tied head is the embedding, so it has no name of its own there (safetensors refuses shared tensors)."""
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


def read_json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise HFImportError(f"{path}: no {name} (a Hugging Face model directory has config.json, "
                            f"model.safetensors and tokenizer.json)")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, OSError) as e:
        raise HFImportError(f"{file}: not valid json ({e})") from None
    if not isinstance(doc, dict):
        raise HFImportError(f"{file}: holds a json {type(doc).__name__}, not an object")
    return doc


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def model_config_from_hf(config: dict, where: str) -> dict:
    """Our ModelConfig fields from a Qwen3 config.json (`where` names it in messages). Each field
    is honoured, or refused by name where our model cannot compute what it asks for; a field
    Qwen3 does not have is refused too, unless it is metadata. Missing fields take Qwen3Config's defaults."""
    architectures = config.get("architectures") or ["Qwen3ForCausalLM"]
    if config.get("model_type") != "qwen3" or architectures != ["Qwen3ForCausalLM"]:
        raise HFImportError(f"{where}: model_type {config.get('model_type')!r}, architectures "
                            f"{config.get('architectures')}; only a Qwen3ForCausalLM (model_type 'qwen3') "
                            f"can be imported")
    unknown = sorted(config.keys() - MODEL_FIELDS - METADATA_FIELDS - SLIDING_WINDOW_FIELDS)
    if unknown:
        raise HFImportError(f"{where}: {', '.join(unknown)} is not a Qwen3ForCausalLM field, and our model cannot tell "
                            f"what it would change; remove it from config.json if it changes nothing")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not is_int(config.get(field)):
            raise HFImportError(f"{where}: {field} is missing or not an integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", 32)  # Qwen3Config's default; null means one per query head
    kv_heads = heads if kv_heads is None else kv_heads
    max_seq_len = config.get("max_position_embeddings", 32768)
    for field, value in (("num_key_value_heads", kv_heads), ("max_position_embeddings", max_seq_len)):
        if not is_int(value):
            raise HFImportError(f"{where}: {field} is {value!r}, not an integer")
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise HFImportError(f"{where}: rope_parameters is {rope!r}, not an object")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rms_norm_eps = config.get("rms_norm_eps", 1e-6)
    for field, value in (("rope_theta", rope_theta), ("rms_norm_eps", rms_norm_eps)):
        if not is_positive_number(value):
            raise HFImportError(f"{where}: {field} is {value!r}, not a positive number")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise HFImportError(f"{where}: tie_word_embeddings is {tied!r}, not true or false")
    head_dim = config.get("head_dim", 128)
    head_dim = hidden / heads if head_dim is None else head_dim
    layer_types = config.get("layer_types") or []
    unsupported = {
        "head_dim": (head_dim != hidden / heads,
                     f"is {head_dim}, but our model's head_dim is hidden_size / num_attention_heads = "
                     f"{hidden / heads:g}"),
        "attention_bias": (bool(config.get("attention_bias")), "is true; our attention has no biases"),
        "attention_dropout": (config.get("attention_dropout", 0.0) not in (0, 0.0, None),
                              f"is {config.get('attention_dropout')!r}; our attention has no dropout of its own "
                              f"(set it to 0.0)"),
        "hidden_act": (config.get("hidden_act", "silu") != "silu",
                       f"is {config.get('hidden_act')!r}; our MLP is SwiGLU (silu)"),
        "rope_scaling": (config.get("rope_scaling") is not None,
                         f"is {config.get('rope_scaling')}; our RoPE is unscaled"),
        "rope_parameters": (rope.get("rope_type", "default") != "default"
                            or bool(rope.keys() - {"rope_type", "rope_theta"}),
                            f"is {rope}; our RoPE is the default (unscaled) one, with rope_theta alone"),
        "rope_theta": ("rope_theta" in config and config["rope_theta"] != rope_theta,
                       f"is {config.get('rope_theta')} but rope_parameters has rope_theta {rope_theta}; "
                       f"make them agree"),
        "use_sliding_window": (bool(config.get("use_sliding_window")), "is true; our attention is full (causal)"),
        "layer_types": (not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types),
                        f"is {layer_types}; our attention is full in every layer"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            raise HFImportError(f"{where}: {field} {why}")
    fields = {
        "vocab_size": config["vocab_size"], "hidden_size": hidden, "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": config["intermediate_size"], "max_seq_len": max_seq_len,
        "rope_theta": float(rope_theta), "rms_norm_eps": float(rms_norm_eps),
        "tie_word_embeddings": tied, "dropout": 0.0,
    }
    try:
        return vars(ModelConfig(**fields))
    except ValueError as e:
        raise HFImportError(f"{where}: {e}") from None


def check_special_token_ids(config: dict, tok, where: str):
    """config.json's token ids, where given, must be the tokenizer's, which our scripts use."""
    ids = {"bos_token_id": {tok.bos_id}, "eos_token_id": {tok.eos_id, tok.im_end_id}, "pad_token_id": {tok.pad_id}}
    for field, allowed in ids.items():
        value = config.get(field)
        if any(v is not None and v not in allowed for v in (value if isinstance(value, list) else [value])):
            raise HFImportError(f"{where}: {field} is {value}, but in tokenizer.json that token is "
                                f"{' or '.join(map(str, sorted(allowed)))}; make them agree")


def read_hf_weights(path: str) -> dict:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    try:  # export and import only: training from a .pt never needs safetensors
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise HFImportError(f"{path}: reading a Hugging Face directory needs safetensors: "
                            f"pip install safetensors") from None

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        weight_map = read_json(path, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HFImportError(f"{path}/model.safetensors.index.json: no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFImportError(f"{path}: no model.safetensors (nor model.safetensors.index.json); only safetensors "
                            f"weights are read (save the model with safe_serialization=True)")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(path, name)))
        except (SafetensorError, OSError) as e:
            raise HFImportError(f"{path}/{name}: could not be read ({e})") from None
    return tensors


def state_dict_from_hf(tensors: dict, model_config: dict, path: str) -> dict:
    """Our GPT state dict (float32, as training keeps it), each weight checked for its name, dtype,
    shape and finite values."""
    tied = model_config["tie_word_embeddings"]
    names = {theirs: ours for ours, theirs in weight_names(model_config["num_hidden_layers"], tied).items()}
    head = tensors.pop("lm_head.weight", None) if tied else None
    if head is not None and not torch.equal(head, tensors.get("model.embed_tokens.weight", head)):
        raise HFImportError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                            f"model.embed_tokens.weight; set it to false in config.json")
    missing, unexpected = names.keys() - tensors.keys(), tensors.keys() - names.keys()
    if missing:
        hint = "; set tie_word_embeddings to true in config.json" if missing == {"lm_head.weight"} else ""
        raise HFImportError(f"{path}: weights lack {sorted(missing)[:3]} ({len(missing)} missing){hint}")
    if unexpected:
        raise HFImportError(f"{path}: weights {sorted(unexpected)[:3]} have no place in our model "
                            f"({len(unexpected)} such)")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(ModelConfig(**model_config)).state_dict().items()}
    state = {}
    for theirs, ours in names.items():
        t = tensors[theirs]
        if t.dtype not in READABLE_DTYPES:
            raise HFImportError(f"{path}: {theirs} is {str(t.dtype).removeprefix('torch.')}; only float32, bfloat16, "
                                f"float16 or float64 weights are read (save the model unquantized)")
        if t.shape != shapes[ours]:
            raise HFImportError(f"{path}: {theirs} has shape {tuple(t.shape)}, config.json implies "
                                f"{tuple(shapes[ours])} "
                                f"(vocab_size, hidden_size, heads or intermediate_size mismatch)")
        state[ours] = t.to(torch.float32)
        if not torch.isfinite(state[ours]).all():
            raise HFImportError(f"{path}: {theirs} holds NaN or inf values; the model is broken, use another copy")
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # load_state_dict wants both names
    return state


def exported_stage(path: str) -> str:
    """The stage export_hf.py recorded. Another directory: "hf", a chat model, when its
    tokenizer_config.json has a chat template; else "pretrain", a model that continues plain text."""
    if os.path.exists(os.path.join(path, EXPORT_MARKER)):
        stage = read_json(path, EXPORT_MARKER).get("stage")
        if stage not in STAGES:
            raise HFImportError(f"{path}/{EXPORT_MARKER}: stage is {stage!r}, none of {list(STAGES)}")
        return stage
    chat = os.path.isfile(os.path.join(path, "tokenizer_config.json")) and \
        read_json(path, "tokenizer_config.json").get("chat_template")
    return "hf" if chat else "pretrain"


def load_hf_checkpoint(path: str) -> dict:
    """A checkpoint dict like the training scripts save (model, model_config, tokenizer_path,
    tokenizer_fingerprint, stage) from a Qwen3ForCausalLM directory with our tokenizer conventions
    (byte-level BPE with <|bos|>, <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>)."""
    if not os.path.isdir(path):
        raise HFImportError(f"{path} is not a directory")
    checkpoints = sorted(n for n in os.listdir(path) if n.endswith(".pt"))
    if checkpoints and not os.path.exists(os.path.join(path, "config.json")):
        raise HFImportError(f"{path} is a directory of checkpoints, not a Hugging Face model directory (no "
                            f"config.json); give one of them, e.g. {os.path.join(path, checkpoints[-1])}")
    config = read_json(path, "config.json")
    where = os.path.join(path, "config.json")
    model_config = model_config_from_hf(config, where)
    tokenizer_path = os.path.join(os.path.abspath(path), "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise HFImportError(f"{path}: no tokenizer.json (training needs the model's tokenizer)")
    try:
        tok = load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError) as e:
        raise HFImportError(str(e)) from None
    if tok.vocab_size != model_config["vocab_size"]:
        raise HFImportError(f"{path}: tokenizer.json has {tok.vocab_size} tokens but config.json vocab_size is "
                            f"{model_config['vocab_size']}; they must match")
    check_special_token_ids(config, tok, where)
    stage = exported_stage(path)
    state = state_dict_from_hf(read_hf_weights(path), model_config, path)
    return {"stage": stage, "model": state, "model_config": model_config,
            "tokenizer_path": tokenizer_path, "tokenizer_fingerprint": tok.fingerprint}
