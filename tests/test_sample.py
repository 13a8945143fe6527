"""Specification of sample.py: plain generation from a pretraining checkpoint, the chat loop, the
context clamp, and whole multi-byte characters while streaming."""
import io
import os
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest
import torch

from common import save_checkpoint
from conftest import run_main
from data.prepare import prepare_default
from data.tokenizer import load_tokenizer
from model import GPT, ModelConfig
from sample import parse_args, stream_text


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, n_stories=300, n_sft=20, n_dpo=20, n_eval=5, quiet=True)
    return os.path.join(out, "tokenizer.json")


def checkpoint(path, tok_path, stage):
    """A random tiny model saved as a finished stage."""
    tok = load_tokenizer(tok_path)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=64)
    save_checkpoint(str(path), {"stage": stage, "step": 1, "model": GPT(config).state_dict(),
                                "model_config": vars(config), "tokenizer_path": tok_path,
                                "tokenizer_fingerprint": tok.fingerprint})
    return str(path)


def sample(*flags, stdin=""):
    """`python sample.py FLAGS` with stdin as its input: main() in this process (conftest.run_main)."""
    return run_main("sample.py", *flags, stdin=stdin)


def test_a_pretraining_checkpoint_continues_the_prompt_as_text(tok_path, tmp_path):
    ckpt = checkpoint(tmp_path / "pretrain.pt", tok_path, "pretrain")
    r = sample("--ckpt", ckpt, "--prompt", "Mia lives in", "--max_new_tokens", "12", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Mia lives in") and len(r.stdout.strip()) > len("Mia lives in")


def test_chat_answers_each_message_and_exits_at_end_of_input(tok_path, tmp_path):
    ckpt = checkpoint(tmp_path / "sft.pt", tok_path, "sft")
    r = sample("--ckpt", ckpt, "--chat", "--max_new_tokens", "8", "--temperature", "1", "--seed", "0",
               stdin="Where does Mia live?\nAnd Tom?\n")
    assert r.returncode == 0, r.stderr[-2000:]
    turns = r.stdout.split("> ")
    assert len(turns) == 4, r.stdout  # before the first prompt, two replies, the prompt that met EOF
    assert turns[1].strip() and turns[2].strip()  # each message got a reply


def test_chat_stops_at_exit(tok_path, tmp_path):
    ckpt = checkpoint(tmp_path / "sft.pt", tok_path, "sft")
    r = sample("--ckpt", ckpt, "--chat", "--max_new_tokens", "4", "--temperature", "0",
               stdin="hello\nexit\nnever read\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("> ") == 2


def test_max_new_tokens_is_clamped_to_the_context_and_says_so(tok_path, tmp_path):
    ckpt = checkpoint(tmp_path / "pretrain.pt", tok_path, "pretrain")
    r = sample("--ckpt", ckpt, "--prompt", "Mia", "--max_new_tokens", "1000")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "clamped to" in r.stderr and "max_seq_len=64" in r.stderr


def test_streaming_prints_a_character_split_across_tokens_whole(tok_path):
    tok = load_tokenizer(tok_path)
    ids = [tok.enc._mergeable_ranks[bytes([b])] for b in "é!".encode()]  # 0xC3 0xA9 0x21: three byte tokens

    class Scripted:  # a "model" that streams a fixed list of tokens
        config = SimpleNamespace(max_seq_len=64)

        def stream(self, idx, n, **kw):
            for t in ids[:n]:
                yield torch.tensor([t])

    args = SimpleNamespace(max_new_tokens=10, temperature=1.0, top_k=None, chat=False)
    buf = io.StringIO()
    with redirect_stdout(buf):
        out = stream_text(Scripted(), tok, [tok.bos_id], args, tok.eos_id, torch.device("cpu"), torch.no_grad())
    assert out == ids
    assert buf.getvalue() == "é!\n"  # never a U+FFFD for the first byte alone


def test_max_new_tokens_zero_is_a_flag_error_before_anything_loads(tmp_path):
    r = sample("--ckpt", str(tmp_path / "missing.pt"), "--max_new_tokens", "0")
    assert r.returncode == 2
    assert "argument --max_new_tokens: must be an integer >= 1, got '0'" in r.stderr
    assert "fills the context" not in r.stderr and "missing.pt" not in r.stderr


@pytest.mark.parametrize("flag, value, rule", [
    ("--max_new_tokens", "-3", "an integer >= 1"),
    ("--temperature", "-0.5", "a number >= 0"),
    ("--temperature", "nan", "a number >= 0"),
    ("--top_k", "-1", "an integer >= 0"),
    ("--top_k", "2.5", "an integer >= 0"),
    ("--seed", "-1", f"an integer >= 0 and <= {2**64 - 1}"),
    ("--seed", str(2**70), f"an integer >= 0 and <= {2**64 - 1}"),
])
def test_out_of_range_numeric_flags_are_refused_naming_the_flag_and_range(flag, value, rule, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be {rule}, got '{value}'" in capsys.readouterr().err


def test_an_unknown_device_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "gpu"])
    assert "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_the_edges_of_each_range_are_accepted():
    args = parse_args(["--max_new_tokens", "1", "--temperature", "0", "--top_k", "0", "--seed", "0", "--device", "cpu"])
    assert (args.max_new_tokens, args.temperature, args.top_k, args.seed) == (1, 0.0, 0, 0)


def one_error(r) -> str:
    """sample.py stopped with exactly one `error:` line and no Traceback; returns that line."""
    assert r.returncode != 0, r.stdout[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_prompt_that_fills_the_context_is_refused_with_a_nonzero_exit(tok_path, tmp_path, stage):
    ckpt = checkpoint(tmp_path / f"{stage}.pt", tok_path, stage)
    r = sample("--ckpt", ckpt, "--prompt", "Mia lives in a house. " * 40, "--device", "cpu")
    err = one_error(r)
    assert "--prompt" in err and "max_seq_len=64" in err and "shorten it" in err
    assert r.stdout == ""  # refused before any output, the prompt not echoed


def test_chat_answers_the_messages_that_fit_and_exits_nonzero_for_one_that_did_not(tok_path, tmp_path):
    ckpt = checkpoint(tmp_path / "sft.pt", tok_path, "sft")
    r = sample("--ckpt", ckpt, "--chat", "--max_new_tokens", "4", "--temperature", "0",
               stdin="hello\n" + "Mia lives in a house. " * 40 + "\nand Tom?\n")
    err = one_error(r)
    assert "1 message(s) did not fit" in err and "max_seq_len=64" in err
    assert "fills the context" in r.stderr
    assert r.stdout.count("> ") == 4  # every line was read; the two that fit were answered


def test_an_hf_export_of_a_pretraining_checkpoint_continues_plain_text_as_the_checkpoint_does(tok_path, tmp_path):
    from export_hf import export
    ckpt = checkpoint(tmp_path / "ckpt" / "pretrain.pt", tok_path, "pretrain")
    export(ckpt, str(tmp_path / "hf"))
    flags = ["--prompt", "Mia lives in", "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]
    from_export, from_checkpoint = sample("--ckpt", str(tmp_path / "hf"), *flags), sample("--ckpt", ckpt, *flags)
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert "pretrain checkpoint" in from_export.stderr
    assert from_export.stdout.startswith("Mia lives in") and from_export.stdout == from_checkpoint.stdout
