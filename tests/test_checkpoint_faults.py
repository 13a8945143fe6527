"""Specification of how a checkpoint that cannot be a model is refused: one written by another version
of these scripts (a key missing, a model_config field unknown or missing, weights that do not fit the
config), or one whose weights hold NaN or inf. Every reader (sample.py, export_hf.py, a stage's
--init_from or --resume) stops with one `error:` line naming the checkpoint, and no file changes."""
import os
import shutil

import pytest
import torch

from common import load_checkpoint, save_checkpoint
from conftest import one_error, run_main
from data.prepare import prepare_default
from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, vocab_size=512, n_stories=300, n_sft=20, n_dpo=20, n_eval=5, quiet=True)
    return out


def checkpoint(path, data_dir, stage="pretrain", edit=None):
    """A random tiny model saved as a finished stage, after edit(ckpt) changed the dict; returns the path."""
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=64)
    ckpt = {"stage": stage, "step": 1, "model": GPT(config).state_dict(), "model_config": vars(config),
            "tokenizer_path": os.path.join(data_dir, "tokenizer.json"), "tokenizer_fingerprint": tok.fingerprint}
    if edit is not None:
        edit(ckpt)
    save_checkpoint(str(path), ckpt)
    return str(path)


def tree_bytes(root):
    """Every file under root (relative path -> contents), but a training run's lock file, which
    holds nothing and is taken before the checkpoint is read."""
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names if not n.endswith(".lock")}


def readers(ckpt, data_dir, tmp_path):
    """Each way a user hands a checkpoint to the scripts, as a command line."""
    return {
        "sample": ["sample.py", "--ckpt", ckpt, "--prompt", "Mia", "--max_new_tokens", "2", "--device", "cpu"],
        "export": ["export_hf.py", "--ckpt", ckpt, "--out_dir", str(tmp_path / "hf")],
        "init_from": ["train_full_sft_muon.py", "--init_from", ckpt, "--data_path", data_dir,
                      "--out_dir", str(tmp_path / "run"), "--max_steps", "1", "--device", "cpu", "--no-compile"],
    }


def set_in(key, value):
    def edit(ckpt):
        ckpt["model_config"][key] = value
    return edit


def drop_from(part, key):
    def edit(ckpt):
        del ckpt[part][key]
    return edit


def add_weight(name, value):
    def edit(ckpt):
        ckpt["model"][name] = value
    return edit


def replace_weight(name, make):
    def edit(ckpt):
        ckpt["model"][name] = make(ckpt["model"][name])
    return edit


ANOTHER_VERSION = {  # edit, what the message names
    "unknown model_config field": (set_in("num_experts", 8), "num_experts"),
    "missing model_config field": (drop_from("model_config", "rope_theta"), "rope_theta"),
    "invalid model_config value": (set_in("num_key_value_heads", 3), "num_key_value_heads"),
    "missing weight": (drop_from("model", "layers.0.mlp.up_proj.weight"), "layers.0.mlp.up_proj.weight"),
    "unknown weight": (add_weight("layers.0.attn.q_proj.bias", torch.zeros(32)), "layers.0.attn.q_proj.bias"),
    "weight of another shape": (replace_weight("layers.0.mlp.down_proj.weight", lambda w: w[:, :16].clone()),
                                "layers.0.mlp.down_proj.weight"),
    "integer weight": (replace_weight("norm.weight", lambda w: w.to(torch.int8)), "norm.weight"),
}


@pytest.mark.parametrize("reader", ["sample", "export", "init_from"])
@pytest.mark.parametrize("kind", list(ANOTHER_VERSION))
def test_a_checkpoint_of_another_version_stops_each_reader_with_one_line_naming_it(kind, reader, data_dir, tmp_path):
    edit, named = ANOTHER_VERSION[kind]
    ckpt = checkpoint(tmp_path / "ckpts" / "pretrain.pt", data_dir, edit=edit)
    before = tree_bytes(tmp_path)
    err = one_error(run_main(*readers(ckpt, data_dir, tmp_path)[reader]))
    assert ckpt in err and named in err, err
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("reader", ["sample", "export", "init_from"])
def test_a_checkpoint_with_nonfinite_weights_is_refused_naming_it_and_the_weight(reader, value, data_dir, tmp_path):
    def poison(ckpt):
        ckpt["model"]["layers.0.attn.k_proj.weight"][0, 0] = value
    ckpt = checkpoint(tmp_path / "ckpts" / "pretrain.pt", data_dir, edit=poison)
    before = tree_bytes(tmp_path)
    err = one_error(run_main(*readers(ckpt, data_dir, tmp_path)[reader]))
    assert ckpt in err and "layers.0.attn.k_proj.weight" in err and "NaN or inf" in err, err
    assert tree_bytes(tmp_path) == before


def test_a_checkpoint_from_before_norm_weights_loads_with_its_gains(data_dir, tmp_path):
    # norm_weights is newer than some checkpoints; their models all had RMSNorm gains
    path = checkpoint(tmp_path / "pretrain.pt", data_dir, edit=drop_from("model_config", "norm_weights"))
    ckpt = load_checkpoint(path)
    assert ckpt["model_config"]["norm_weights"] is True
    GPT(ModelConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])
    r = run_main("sample.py", "--ckpt", path, "--prompt", "Mia", "--max_new_tokens", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]


def test_export_in_float16_refuses_weights_beyond_its_range(data_dir, tmp_path):
    ckpt = checkpoint(tmp_path / "ckpts" / "pretrain.pt", data_dir,
                      edit=replace_weight("layers.0.mlp.gate_proj.weight", lambda w: w + 1e5))
    err = one_error(run_main("export_hf.py", "--ckpt", ckpt, "--out_dir", str(tmp_path / "hf"), "--dtype", "float16"))
    assert "model.layers.0.mlp.gate_proj.weight" in err and "--dtype bfloat16" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpts"]
    r = run_main("export_hf.py", "--ckpt", ckpt, "--out_dir", str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr[-2000:]


def test_resuming_a_checkpoint_of_another_version_without_optimizer_state_stops_with_one_line(data_dir, tmp_path):
    out = tmp_path / "out"
    run = ["train_pretrain_muon.py", "--data_path", data_dir, "--out_dir", str(out), "--hidden_size", "32",
           "--num_hidden_layers", "1", "--num_attention_heads", "2", "--num_key_value_heads", "1",
           "--max_seq_len", "64", "--batch_size", "2", "--eval_iters", "1", "--log_interval", "1",
           "--warmup_steps", "1", "--sample_prompt", "", "--device", "cpu", "--no-compile"]
    r = run_main(*run, "--max_steps", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpt = torch.load(out / "pretrain.pt", weights_only=True)
    del ckpt["rng"]
    save_checkpoint(str(out / "pretrain.pt"), ckpt)
    before = tree_bytes(out)
    err = one_error(run_main(*run, "--max_steps", "2", "--resume"))
    assert "pretrain.pt" in err and "'rng'" in err and "--init_from" in err
    assert tree_bytes(out) == before


def test_a_checkpoint_that_records_no_tokenizer_takes_the_one_beside_it_or_says_so(data_dir, tmp_path):
    path = checkpoint(tmp_path / "ckpts" / "pretrain.pt", data_dir, edit=lambda ckpt: ckpt.pop("tokenizer_path"))
    flags = ["--ckpt", path, "--prompt", "Mia", "--max_new_tokens", "2", "--device", "cpu"]
    err = one_error(run_main("sample.py", *flags))
    assert path in err and "records no tokenizer" in err and "--tokenizer" in err
    shutil.copy(os.path.join(data_dir, "tokenizer.json"), tmp_path / "ckpts")  # a checkpoint copied with its tokenizer
    r = run_main("sample.py", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
