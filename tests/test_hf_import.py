"""hf_import.py: a Qwen3ForCausalLM directory that transformers itself wrote becomes our model with
every config.json field honoured (an untied head, its rope_theta, MLP width and norm epsilon) or
refused by name, its weights checked; a training stage started from it computes the HF model's own
loss. Bad input raises HFImportError, which every script turns into one line, changing no file."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from common import load_checkpoint
from conftest import randomize, run_main
from data.loaders import eval_batches
from data.prepare import prepare_default
from data.tokenizer import load_tokenizer
from export_hf import hf_tokenizer_json
from hf_import import HFImportError, load_hf_checkpoint
from model import GPT, ModelConfig

# every value off our defaults: a head of its own, another RoPE base, MLP width and norm epsilon
QWEN3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, vocab_size=512, n_stories=300, n_sft=20, n_dpo=20, n_eval=5, quiet=True)
    return out


@pytest.fixture(scope="module")
def qwen3(data_dir, tmp_path_factory):
    """(directory, model): a random Qwen3ForCausalLM saved by transformers' save_pretrained, with
    the data's tokenizer as tokenizer.json."""
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    torch.manual_seed(0)
    model = randomize(Qwen3ForCausalLM(Qwen3Config(vocab_size=tok.vocab_size, **QWEN3))).eval()
    d = str(tmp_path_factory.mktemp("qwen3") / "model")
    model.save_pretrained(d)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(hf_tokenizer_json(tok), f)
    return d, model


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(str(dst))
    return str(dst)


def edit_config(**changes):
    def edit(d):
        with open(os.path.join(d, "config.json")) as f:
            doc = json.load(f)
        doc.update(changes)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(doc, f)
    return edit


def edit_weights(change):
    def edit(d):
        path = os.path.join(d, "model.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return edit


def import_error(qwen3, tmp_path, edit) -> str:
    """The HFImportError of a broken copy of the qwen3 directory; its files must stay byte-identical."""
    d = broken_copy(qwen3[0], tmp_path / "broken", edit)
    before = {n: read_bytes(os.path.join(d, n)) for n in os.listdir(d)}
    with pytest.raises(HFImportError) as e:
        load_hf_checkpoint(d)
    assert "\n" not in str(e.value)
    assert {n: read_bytes(os.path.join(d, n)) for n in os.listdir(d)} == before
    return str(e.value)


# ------------------------------------------------------------------------- honoured

@torch.no_grad()
def test_a_directory_transformers_wrote_computes_its_logits_in_our_model(qwen3):
    d, hf_model = qwen3
    ckpt = load_hf_checkpoint(d)
    config = ckpt["model_config"]
    assert (config["tie_word_embeddings"], config["rope_theta"], config["intermediate_size"], config["rms_norm_eps"],
            config["max_seq_len"]) == (False, 5000.0, 96, 1e-5, 64)
    model = GPT(ModelConfig(**config)).eval()
    model.load_state_dict(ckpt["model"])
    idx = torch.randint(0, config["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    assert (model(idx)[0] - hf_model(input_ids=idx).logits).abs().max().item() < 1e-4


def test_pretraining_from_a_qwen3_directory_starts_at_the_hf_models_own_loss(qwen3, data_dir, tmp_path):
    d, hf_model = qwen3
    out = tmp_path / "out"
    r = run_main("train_pretrain_muon.py", "--init_from", d, "--data_path", data_dir, "--out_dir", str(out),
                 "--max_steps", "1", "--device", "cpu", "--no-compile", "--batch_size", "2", "--eval_iters", "1",
                 "--warmup_steps", "1", "--log_interval", "1", "--sample_prompt", "")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert torch.load(out / "pretrain.pt", weights_only=True)["model_config"] == load_hf_checkpoint(d)["model_config"]
    with open(out / "pretrain_metrics.jsonl") as f:
        step0 = next(row for row in map(json.loads, f) if row["step"] == 0 and "val_loss" in row)
    (x, y), = eval_batches(os.path.join(data_dir, "val.bin"), 2, QWEN3["max_position_embeddings"], 1)
    with torch.no_grad():
        logits = hf_model(input_ids=x.long()).logits
    hf_loss = F.cross_entropy(logits.flatten(0, 1), y.long().flatten()).item()
    assert abs(step0["val_loss"] - hf_loss) < 1e-4


def test_an_export_records_its_stage_and_another_directory_chats_only_with_a_chat_template(qwen3, tmp_path):
    d = broken_copy(qwen3[0], tmp_path / "plain", lambda d: None)
    assert load_hf_checkpoint(d)["stage"] == "pretrain"  # transformers wrote no tokenizer_config.json
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ messages }}"}, f)
    assert load_hf_checkpoint(d)["stage"] == "hf"
    with open(os.path.join(d, "export_hf.json"), "w") as f:
        json.dump({"stage": "dpo", "files": []}, f)
    assert load_hf_checkpoint(d)["stage"] == "dpo"


# ------------------------------------------------------------------------- refused by name

@pytest.mark.parametrize("changes, named", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5}},
     "rope_parameters"),
    ({"rope_theta": 10000.0}, "rope_theta"),
    ({"num_key_value_heads": "two"}, "num_key_value_heads"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"eos_token_id": 3}, "eos_token_id"),
    ({"pad_token_id": 0}, "pad_token_id"),
])
def test_a_config_field_our_model_would_not_honour_is_refused_by_name(qwen3, tmp_path, changes, named):
    assert f"config.json: {named}" in import_error(qwen3, tmp_path, edit_config(**changes))


def test_a_config_json_that_is_not_an_object_is_refused(qwen3, tmp_path):
    def write_list(d):
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump([1, 2], f)
    assert "config.json: holds a json list, not an object" in import_error(qwen3, tmp_path, write_list)


def test_an_untied_directory_without_its_head_says_how_to_tie_it(qwen3, tmp_path):
    err = import_error(qwen3, tmp_path, edit_weights(lambda t: t.pop("lm_head.weight")))
    assert "lm_head.weight" in err and "set tie_word_embeddings to true" in err


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_weights_are_refused_naming_the_weight_and_its_dtype(qwen3, tmp_path, dtype):
    def quantize(t):
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].to(dtype)
    err = import_error(qwen3, tmp_path, edit_weights(quantize))
    assert f"model.layers.1.mlp.up_proj.weight is {str(dtype).removeprefix('torch.')}" in err


def test_a_weight_holding_nan_is_refused_naming_it(qwen3, tmp_path):
    def poison(t):
        t["model.norm.weight"][3] = float("nan")
    assert "model.norm.weight holds NaN or inf" in import_error(qwen3, tmp_path, edit_weights(poison))


def test_a_shard_index_without_a_weight_map_is_refused(qwen3, tmp_path):
    def index(d):
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}}, f)
    assert "no weight_map" in import_error(qwen3, tmp_path, index)


@pytest.mark.parametrize("script", ["sample.py", "export_hf.py", "train_full_sft_muon.py"])
def test_every_script_reports_a_refused_directory_in_one_line(qwen3, tmp_path, script):
    d = broken_copy(qwen3[0], tmp_path / "broken", edit_config(quantization_config={"bits": 4}))
    flag = "--init_from" if script.startswith("train") else "--ckpt"
    args = {"sample.py": [], "export_hf.py": ["--out_dir", str(tmp_path / "hf")],
            "train_full_sft_muon.py": ["--out_dir", str(tmp_path / "run"), "--device", "cpu"]}[script]
    r = run_main(script, flag, d, *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {d}/config.json: quantization_config is not a Qwen3ForCausalLM field, and our model cannot tell "
        f"what it would change; remove it from config.json if it changes nothing"]
    assert not os.path.exists(tmp_path / "hf")
    with pytest.raises(SystemExit):
        load_checkpoint(d)


def test_a_shard_index_naming_a_missing_shard_is_refused_naming_it(qwen3, tmp_path):
    def index(d):
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
    assert "model-00002-of-00002.safetensors: could not be read" in import_error(qwen3, tmp_path, index)


def test_a_directory_of_checkpoints_given_as_a_model_directory_names_a_checkpoint_in_it(tmp_path):
    (tmp_path / "pretrain.pt").write_bytes(b"")
    (tmp_path / "sft.pt").write_bytes(b"")
    with pytest.raises(HFImportError, match="a directory of checkpoints.*give one of them, e.g. .*sft.pt"):
        load_hf_checkpoint(str(tmp_path))
