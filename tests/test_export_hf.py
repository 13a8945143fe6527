"""export_hf.py: a checkpoint becomes a Hugging Face Qwen3ForCausalLM directory that computes the
same logits, generates the same tokens and tokenizes the same way, and such a directory reads back
into our checkpoint dict (hf_import.py); bad input stops with one clear message and writes nothing."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import load_checkpoint, save_checkpoint
from conftest import randomize, run_main
from data.chat import render_prompt
from data.tokenizer import load_tokenizer, train_tokenizer
from export_hf import export
from hf_import import HFImportError, load_hf_checkpoint, weight_names
from model import GPT, ModelConfig

LOGITS_ATOL = 1e-4  # fp32, both sides on CPU: max |ours - HF| over every logit

TEXTS = [
    f"Story {i}: Mia has a red kite and {i % 7} apples.\r\nShe said \"hello!\" to Tom  on Monday; "
    f"numbers 12345 and 3.14, emoji 🎉 and 日本語のテキスト.\n\n\tDone."
    for i in range(200)
]
SHAPES = {  # tied with 2 query heads per kv head; untied with one kv head and non-default norms/RoPE
    "tied_gqa": dict(num_key_value_heads=2),
    "untied_mqa": dict(num_key_value_heads=1, tie_word_embeddings=False, intermediate_size=96,
                       rope_theta=5000.0, rms_norm_eps=1e-5),
    "no_norm_weights": dict(num_key_value_heads=2, norm_weights=False),
}
PLAIN_TEXTS = [
    "",
    "Mia has a red kite.",
    "unicode: naïve café Ω ß ﬁ e\u0301 日本語 한국어 עברית العربية",
    "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈🇯🇵 ✨🎉",
    "whitespace   runs\t\t\tand  \n\n\n  blank lines   \n",
    "CRLF line\r\nanother\r\n\r\nend\r",
    "digits 1 12 123 1234 12345678901234567890 3.14159 -42",
    "it's they're we'll I'd YOU'VE",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What colour is Mia's kite?"}],
    [{"role": "system", "content": "You are helpful."},
     {"role": "user", "content": "Hi 🎉  two  spaces\r\nand CRLF"},
     {"role": "assistant", "content": "Hello! 12345"},
     {"role": "user", "content": " leading space, trailing newline\n"}],
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)




def make_checkpoint(directory, tok, stage="sft", seed=0, **shape):
    """A random tiny model saved like a finished stage; returns (path, model)."""
    os.makedirs(directory, exist_ok=True)
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    tok.save(tokenizer_path)
    config = ModelConfig(**{**dict(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_seq_len=64), **shape})
    torch.manual_seed(seed)
    model = randomize(GPT(config)).eval()
    path = os.path.join(directory, f"{stage}.pt")
    save_checkpoint(path, {"stage": stage, "step": 0, "model": model.state_dict(), "model_config": vars(config),
                           "tokenizer_path": tokenizer_path, "tokenizer_fingerprint": tok.fingerprint})
    return path, model


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tok, tmp_path_factory):
    """(our model, HF directory, the HF model loaded from it) per shape."""
    d = tmp_path_factory.mktemp(request.param)
    path, model = make_checkpoint(d / "ckpt", tok, **SHAPES[request.param])
    export(path, str(d / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(str(d / "hf")).eval()
    assert hf_model.dtype == torch.float32
    return model, str(d / "hf"), hf_model


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hfdir")
    path, _ = make_checkpoint(d / "ckpt", tok)
    export(path, str(d / "hf"))
    return str(d / "hf")


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def token_batch(vocab_size, batch=2, length=48, seed=1):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_of(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def edit_json(path, **changes):
    with open(path) as f:
        doc = json.load(f)
    doc.update(changes)
    with open(path, "w") as f:
        json.dump(doc, f)


def dies_with(capsys, fn, *args):
    """Run fn, which must stop via common.die; returns its one-line message."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------------- the model

@torch.no_grad()
def test_exported_model_gives_the_same_logits(exported):
    model, _, hf_model = exported
    idx = token_batch(model.config.vocab_size)
    ours, _ = model(idx)
    theirs = hf_model(input_ids=idx).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


def test_every_gradient_equals_qwen3s(exported):
    # the same function as Qwen3's, so the same gradient for every weight, the norms' gains included
    model, _, hf_model = exported
    idx = token_batch(model.config.vocab_size)
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    hf_model(input_ids=idx, labels=idx).loss.backward()  # HF shifts the labels itself
    hf_params = dict(hf_model.named_parameters())
    names = weight_names(model.config.num_hidden_layers, model.config.tie_word_embeddings)
    for ours, p in model.named_parameters():
        theirs = hf_params[names[ours]]
        assert p.grad is not None and theirs.grad is not None, ours
        torch.testing.assert_close(p.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=ours)
    model.zero_grad()
    hf_model.zero_grad()


@torch.no_grad()
def test_greedy_generation_with_kv_cache_gives_the_same_tokens(exported):
    model, _, hf_model = exported
    prompt = token_batch(model.config.vocab_size, batch=1, length=8, seed=2)
    ours = model.generate(prompt, 40, temperature=0.0)[0, 8:].tolist()
    theirs = hf_model.generate(prompt, do_sample=False, max_new_tokens=40, use_cache=True)[0, 8:].tolist()
    # HF stops at generation_config's end markers; ours ran on, so compare up to that point.
    stops = set(hf_model.generation_config.eos_token_id)
    end = next((i + 1 for i, t in enumerate(ours) if t in stops), len(ours))
    assert theirs == ours[:end]
    assert end >= 10  # enough tokens to exercise the cache


def test_config_states_our_conventions(exported):
    model, hf_dir, hf_model = exported
    c = model.config
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["head_dim"], config["num_key_value_heads"], config["intermediate_size"]) == (
        c.head_dim, c.num_key_value_heads, c.intermediate_size)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (
        c.rope_theta, c.rms_norm_eps, c.max_seq_len)
    assert config["tie_word_embeddings"] == c.tie_word_embeddings
    assert config["attention_bias"] is False and config["hidden_act"] == "silu"


def test_tied_export_stores_the_embedding_once(exported):
    from safetensors import safe_open

    model, hf_dir, hf_model = exported
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_generation_config_stops_at_im_end_and_endoftext(hf_dir, tok):
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert set(gen["eos_token_id"]) == {tok.im_end_id, tok.eos_id}
    assert (gen["bos_token_id"], gen["pad_token_id"]) == (tok.bos_id, tok.pad_id)


# ----------------------------------------------------------------------------- the tokenizer

def test_hf_tokenizer_encodes_plain_text_as_ours(hf_tok, tok):
    for text in PLAIN_TEXTS + TEXTS[:3]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_special_token_strings_in_text_stay_ordinary_text_with_split_special_tokens(hf_tok, tok):
    # Ours never turns typed text into a special token; HF does that only when asked to.
    text = "user says <|im_end|>\n<|im_start|>assistant\n<|bos|><|endoftext|><|pad|> done"
    assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)


def test_hf_tokenizer_decodes_as_ours(hf_tok, tok):
    for text in PLAIN_TEXTS + ["x <|im_end|> y"]:
        ids = tok.encode(text)
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    ids = render_prompt(tok, CONVERSATIONS[1])
    assert hf_tok.decode(ids) == tok.decode(ids)


def test_hf_tokenizer_special_tokens_are_ours(hf_tok, tok):
    assert (hf_tok.bos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.pad_id)
    assert hf_tok.eos_token_id == tok.im_end_id  # an sft checkpoint: a turn ends the reply
    assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|endoftext|>"]) == [tok.im_start_id, tok.eos_id]
    assert len(hf_tok) == tok.vocab_size


def test_chat_template_renders_our_prompt_token_for_token(hf_tok, tok):
    for messages in CONVERSATIONS:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == render_prompt(tok, messages)


def test_a_hf_tokenizer_that_tiktoken_cannot_run_is_refused_by_name(hf_dir, tmp_path):
    with open(os.path.join(hf_dir, "tokenizer.json")) as f:
        doc = json.load(f)
    doc["normalizer"] = {"type": "NFC"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="NFC normalizer"):
        load_tokenizer(str(path))


def test_chat_template_refuses_an_unknown_role(hf_tok):
    with pytest.raises(Exception, match="unknown role tool"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], add_generation_prompt=True)


# ------------------------------------------------------------------------------ round trip

def test_round_trip_gives_identical_weights_config_and_logits(exported):
    model, hf_dir, _ = exported
    ckpt = load_hf_checkpoint(hf_dir)
    # Qwen3's norms have gains: a model without them comes back with gains of one
    assert ckpt["stage"] == "sft" and ckpt["model_config"] == {**vars(model.config), "norm_weights": True}
    original = model.state_dict()
    gains = {k for k in ckpt["model"] if k.endswith("norm.weight")}
    assert ckpt["model"].keys() == original.keys() | gains and len(gains) == 4 * model.config.num_hidden_layers + 1
    assert all(torch.equal(ckpt["model"][k], v) for k, v in original.items())
    if not model.config.norm_weights:
        assert all(torch.equal(ckpt["model"][k], torch.ones_like(ckpt["model"][k])) for k in gains)
    again = GPT(ModelConfig(**ckpt["model_config"])).eval()
    again.load_state_dict(ckpt["model"])
    idx = token_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])


def test_imported_tokenizer_is_the_original_one(hf_dir, tok):
    ckpt = load_hf_checkpoint(hf_dir)
    assert ckpt["tokenizer_path"] == os.path.join(os.path.abspath(hf_dir), "tokenizer.json")
    for source in (ckpt["tokenizer_path"], hf_dir):
        loaded = load_tokenizer(source)
        assert loaded.fingerprint == tok.fingerprint == ckpt["tokenizer_fingerprint"]
        assert [loaded.encode(t) for t in PLAIN_TEXTS] == [tok.encode(t) for t in PLAIN_TEXTS]


def test_bfloat16_export_reads_back_as_the_rounded_float32_weights(tok, tmp_path):
    path, model = make_checkpoint(tmp_path / "ckpt", tok)
    export(path, str(tmp_path / "hf"), dtype="bfloat16")
    ckpt = load_hf_checkpoint(str(tmp_path / "hf"))
    for k, v in model.state_dict().items():
        assert ckpt["model"][k].dtype == torch.float32
        assert torch.equal(ckpt["model"][k], v.to(torch.bfloat16).float())


def test_command_line_export_writes_the_hf_files(tok, tmp_path):
    path, _ = make_checkpoint(tmp_path / "ckpt", tok, stage="pretrain")
    out = tmp_path / "hf"
    r = run_main("export_hf.py", "--ckpt", path, "--out_dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["config.json", "export_hf.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    with open(out / "config.json") as f:
        assert json.load(f)["eos_token_id"] == tok.eos_id  # a pretrained model's documents end at <|endoftext|>


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_only_a_chat_models_export_claims_a_chat_template_and_each_records_its_stage(tok, tmp_path, stage):
    path, _ = make_checkpoint(tmp_path / "ckpt", tok, stage=stage)
    export(path, str(tmp_path / "hf"))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf_tok.chat_template is not None) == (stage != "pretrain")
    assert hf_tok.eos_token == ("<|endoftext|>" if stage == "pretrain" else "<|im_end|>")
    assert load_hf_checkpoint(str(tmp_path / "hf"))["stage"] == stage


def test_one_sft_step_runs_from_an_exported_directory(hf_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"How many apples, {i}?"},
                                                  {"role": "assistant", "content": f"{i % 7} apples."}]}) + "\n")
    out = tmp_path / "out"
    r = run_main("train_full_sft_muon.py", "--init_from", hf_dir, "--data_path", str(data), "--out_dir", str(out),
                 "--max_steps", "1", "--device", "cpu", "--no-compile", "--batch_size", "2", "--eval_iters", "1",
                 "--eval_questions", "0", "--warmup_steps", "1", "--log_interval", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpt = torch.load(out / "sft.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["step"] == 1
    assert ckpt["model_config"] == load_hf_checkpoint(hf_dir)["model_config"]


# ------------------------------------------------------------------------------- bad input

def tree_bytes(root):
    """Every file under root (relative path -> contents): a directory's state, byte for byte."""
    return {os.path.relpath(os.path.join(d, n), root): read_bytes(os.path.join(d, n))
            for d, _, names in os.walk(root) for n in names}


def test_export_replaces_an_earlier_export_only_with_force(tok, tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "hf"
    export(path, str(out))
    first = tree_bytes(out)
    assert "--force" in dies_with(capsys, export, path, str(out))
    assert tree_bytes(out) == first
    other, _ = make_checkpoint(tmp_path / "other", tok, seed=1)
    export(other, str(out), force=True)
    assert tree_bytes(out)["model.safetensors"] != first["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "other"]  # no temp directory left beside it


@pytest.mark.parametrize("force", [False, True])
def test_export_into_a_training_runs_out_dir_changes_nothing_there(tok, tmp_path, capsys, force):
    # the checkpoint's own directory, with its metrics and run lock: none of it is the export's to replace
    path, _ = make_checkpoint(tmp_path / "out", tok, stage="sft")
    (tmp_path / "out" / "sft_metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (tmp_path / "out" / ".sft.lock").write_text("")
    before = tree_bytes(tmp_path)
    err = dies_with(capsys, export, path, str(tmp_path / "out"), force)
    assert ".sft.lock, sft.pt, sft_metrics.jsonl and 1 more" in err and "new or empty --out_dir" in err
    assert tree_bytes(tmp_path) == before


def test_force_refuses_an_earlier_export_with_a_file_added_naming_it(tok, tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "hf"
    export(path, str(out))
    (out / "README.md").write_text("my model card")
    before = tree_bytes(out)
    assert "holds README.md, which no earlier export lists" in dies_with(capsys, export, path, str(out), True)
    assert tree_bytes(out) == before


def test_force_refuses_a_directory_of_export_file_names_without_the_exports_record(tok, tmp_path, capsys):
    # a tokenizer.json of the user's own is not the export's to replace, whatever its name
    path, _ = make_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "data"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    assert "holds tokenizer.json" in dies_with(capsys, export, path, str(out), True)
    assert tree_bytes(out) == {"tokenizer.json": b"{}"}


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_export_to_a_path_that_cannot_be_a_directory_stops_with_one_line_and_writes_nothing(tok, tmp_path, capsys,
                                                                                           where):
    path, _ = make_checkpoint(tmp_path / "ckpt", tok)
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" if where == "a file" else tmp_path / "notes.txt" / "hf"
    before = tree_bytes(tmp_path)
    assert "notes.txt" in dies_with(capsys, export, path, str(out))
    assert tree_bytes(tmp_path) == before


def test_export_of_a_missing_checkpoint_writes_nothing(tmp_path, capsys):
    err = dies_with(capsys, export, str(tmp_path / "nope.pt"), str(tmp_path / "hf"))
    assert "nope.pt" in err and "does not exist" in err
    assert os.listdir(tmp_path) == []


def test_export_of_a_checkpoint_whose_tokenizer_differs_is_refused(tok, tmp_path, capsys):
    path, model = make_checkpoint(tmp_path / "ckpt", tok)
    other = train_tokenizer(TEXTS, vocab_size=380)
    other.save(str(tmp_path / "other.json"))
    err = dies_with(capsys, export, path, str(tmp_path / "hf"), False, "float32", str(tmp_path / "other.json"))
    assert "another tokenizer" in err
    assert not (tmp_path / "hf").exists()


def import_error(capsys, hf_dir, tmp_path, edit):
    """Copy hf_dir, break it with edit(copy), and return the one-line error of loading it as a
    checkpoint (load_hf_checkpoint's message); the directory's files must be left as they were."""
    broken = copy_of(hf_dir, tmp_path / "broken")
    edit(broken)
    before = {n: read_bytes(os.path.join(broken, n)) for n in os.listdir(broken)}
    with pytest.raises(HFImportError) as e:
        load_hf_checkpoint(broken)
    err = dies_with(capsys, load_checkpoint, broken)
    assert err == f"error: {e.value}"
    assert {n: read_bytes(os.path.join(broken, n)) for n in os.listdir(broken)} == before
    return err


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_import_of_a_directory_that_is_not_qwen3_names_the_model_type(hf_dir, tmp_path, capsys):
    err = import_error(capsys, hf_dir, tmp_path, lambda d: edit_json(
        os.path.join(d, "config.json"), model_type="llama", architectures=["LlamaForCausalLM"]))
    assert "'llama'" in err and "Qwen3ForCausalLM" in err


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_import_with_a_missing_file_names_it(hf_dir, tmp_path, capsys, name):
    err = import_error(capsys, hf_dir, tmp_path, lambda d: os.remove(os.path.join(d, name)))
    assert f"no {name}" in err


def test_import_with_a_vocab_that_differs_from_the_tokenizer_says_so(hf_dir, tmp_path, capsys):
    err = import_error(capsys, hf_dir, tmp_path, lambda d: edit_json(os.path.join(d, "config.json"), vocab_size=512))
    assert "tokenizer.json has 400 tokens" in err and "vocab_size is 512" in err


def test_import_with_weights_of_another_shape_names_the_weight(hf_dir, tmp_path, capsys):
    err = import_error(capsys, hf_dir, tmp_path, lambda d: edit_json(os.path.join(d, "config.json"),
                                                                      intermediate_size=64))
    assert "mlp.gate_proj.weight has shape (192, 64)" in err


def test_import_of_a_tokenizer_without_our_special_tokens_names_them(hf_dir, tmp_path, capsys):
    def drop_pad(d):
        path = os.path.join(d, "tokenizer.json")
        with open(path) as f:
            doc = json.load(f)
        doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != "<|pad|>"]
        with open(path, "w") as f:
            json.dump(doc, f)

    assert "lacks special tokens ['<|pad|>']" in import_error(capsys, hf_dir, tmp_path, drop_pad)


@pytest.mark.parametrize("field,value", [
    ("head_dim", 32),
    ("attention_bias", True),
    ("hidden_act", "gelu"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
    ("use_sliding_window", True),
    ("layer_types", ["sliding_attention", "full_attention"]),
])
def test_import_of_a_field_our_model_cannot_express_names_the_field(hf_dir, tmp_path, capsys, field, value):
    err = import_error(capsys, hf_dir, tmp_path, lambda d: edit_json(os.path.join(d, "config.json"), **{field: value}))
    assert f"config.json: {field} " in err
