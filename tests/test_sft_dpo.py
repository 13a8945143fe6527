"""Specification of train_full_sft_muon.py and train_dpo_muon.py: the DPO objective and its log-probs,
the SFT loss mask, clear failure on a mismatched --init_from, exact resume, and torchrun."""
import json
import math
import os

import pytest
import torch

from common import save_checkpoint
from data.cache import resolve_chat_data
from data.chat import answer_questions, render_conversation, split_val
from data.loaders import collate_dpo, collate_sft, encode_dpo
from data.prepare import prepare_default
from data.tokenizer import load_tokenizer
from data.readers import DataError, read_dpo_jsonl
from model import GPT, ModelConfig, split_params
from muon import Muon
from train_dpo_muon import dpo_loss, pair_logps, sequence_logps
from conftest import run_main, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"sft": "train_full_sft_muon.py", "dpo": "train_dpo_muon.py"}
INIT_STAGE = {"sft": "pretrain", "dpo": "sft"}
TINY = ["--batch_size", "4", "--eval_iters", "2", "--eval_questions", "4", "--log_interval", "1", "--warmup_steps", "2"]
COMPARED = ("loss", "lr_muon", "lr_adamw", "grad_norm", "val_loss", "answer_acc", "pref_acc", "reward_margin")


# ------------------------------------------------------------------------------ the DPO objective

def test_dpo_loss_matches_a_hand_computed_value():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # rewards 0.5 * (pi - ref): chosen (0.25, 0), rejected (-0.25, 0.25); margins (0.5, -0.25)
    want = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.25))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, 0.0])
    assert rejected.tolist() == pytest.approx([-0.25, 0.25])


def test_dpo_loss_is_log_2_when_the_policy_equals_the_reference():
    logps = torch.tensor([-4.0, -7.5, -1.25])
    loss, chosen, rejected = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.5, -1.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -1.0]), beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all()  # descending the loss raises log p(chosen)
    assert (pr.grad > 0).all()  # ... and lowers log p(rejected)


def test_sequence_logps_sums_log_probs_over_masked_positions_only():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1],
                           [0.5, 0.5, 0.0, 0.0]]])
    logits = probs.clamp(min=1e-30).log() + 3.0  # any shift: log_softmax recovers log(probs)
    targets = torch.tensor([[3, 1, 0, -1]])  # -1: padding
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    got = sequence_logps(logits, targets, mask)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(math.log(0.25) + math.log(0.7), abs=1e-5)


def test_sequence_logps_is_summed_not_averaged_over_the_response():
    logits = torch.zeros(2, 5, 8)  # uniform: each token has log p = -log 8
    targets = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1.0, 1, 1, 1, 0]])
    got = sequence_logps(logits, targets, mask)
    assert got.tolist() == pytest.approx([-2 * math.log(8), -4 * math.log(8)], abs=1e-5)


def test_a_few_muon_dpo_steps_raise_the_margin_of_the_trained_pairs(data_dir):
    # MiniMind users saw DPO stuck at log 2: check the whole path (logps, loss, both optimizers) moves it
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    pairs, _ = encode_dpo(tok, read_dpo_jsonl(os.path.join(data_dir, "dpo_train.jsonl"))[:8], 160)
    x, y, mask = collate_dpo(pairs, tok.pad_id)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, max_seq_len=160))
    ref = GPT(policy.config).requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    muon_params, adamw_params = split_params(policy)
    muon_opt, adamw_opt = Muon(muon_params, lr=0.02, momentum=0.85), torch.optim.AdamW(adamw_params, lr=3e-3)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(ref, x, y, mask)
    losses = []
    for _ in range(10):
        chosen, rejected = pair_logps(policy, x, y, mask)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        losses.append(loss.item())
        loss.backward()
        muon_opt.step()
        adamw_opt.step()
        muon_opt.zero_grad()
        adamw_opt.zero_grad()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.6, losses
    assert (chosen_rewards > rejected_rewards).all()


# --------------------------------------------------------------------------------- the SFT mask

def test_sft_loss_ignores_prompt_targets_and_counts_assistant_targets(data_dir):
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Mia live?"},
             {"role": "assistant", "content": "Mia lives in Oakvale."}]
    ids, mask = render_conversation(tok, convo)
    x, y, loss_mask = collate_sft([(ids, mask)], tok.pad_id)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, max_seq_len=64)).eval()
    base = model(x, y, loss_mask=loss_mask)[1].item()
    prompt_positions = (loss_mask[0] == 0).nonzero().flatten().tolist()
    answer_positions = (loss_mask[0] == 1).nonzero().flatten().tolist()
    assert prompt_positions and answer_positions
    for t in prompt_positions:  # every system/user/header token's target
        y2 = y.clone()
        y2[0, t] = (y2[0, t] + 1) % tok.vocab_size
        assert model(x, y2, loss_mask=loss_mask)[1].item() == base, t
    for t in answer_positions:  # every assistant token and its <|im_end|>
        y2 = y.clone()
        y2[0, t] = (y2[0, t] + 1) % tok.vocab_size
        assert model(x, y2, loss_mask=loss_mask)[1].item() != base, t


# ------------------------------------------------------------------------------- the scripts

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_default(out, n_stories=600, n_sft=200, n_dpo=100, n_eval=20, quiet=True)
    return out


def tiny_checkpoint(path, data_dir, stage, **overrides):
    """A randomly initialised model saved like a finished stage: enough to start the next one from."""
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    shape = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_seq_len=160)
    torch.manual_seed(0)
    config = ModelConfig(**shape)
    ckpt = {"stage": stage, "step": 0, "model": GPT(config).state_dict(), "model_config": vars(config),
            "tokenizer_path": os.path.join(data_dir, "tokenizer.json"), "tokenizer_fingerprint": tok.fingerprint}
    ckpt.update(overrides)
    save_checkpoint(str(path), ckpt)
    return str(path)


@pytest.fixture(scope="module")
def init_ckpts(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    return {stage: tiny_checkpoint(d / f"{INIT_STAGE[stage]}.pt", data_dir, INIT_STAGE[stage]) for stage in SCRIPTS}


def run(stage, data_dir, out_dir, init_from, *flags, nproc=1, check=True):
    """One process: the script's main() in this process (conftest.run_main); more: as torchrun's ranks
    (conftest.run_ranks)."""
    args = [SCRIPTS[stage], "--data_path", data_dir, "--out_dir", str(out_dir), "--init_from", init_from, *TINY, *flags]
    if nproc == 1:
        r = run_main(*args)
    else:
        r = run_ranks(nproc, *args)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(out_dir, stage):
    """{step: merged row} from the stage's metrics jsonl (train and eval rows of a step merged)."""
    rows = {}
    with open(os.path.join(out_dir, f"{stage}_metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.mark.parametrize("stage", SCRIPTS)
def test_init_from_a_checkpoint_of_another_shape_stops_with_a_clear_message(stage, data_dir, init_ckpts, tmp_path):
    r = run(stage, data_dir, tmp_path, init_ckpts[stage], "--hidden_size", "48", "--max_steps", "2", check=False)
    assert r.returncode != 0
    assert "hidden_size=32" in r.stderr and "--hidden_size 48" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / f"{stage}.pt")


def test_init_from_a_checkpoint_of_another_tokenizer_stops_with_a_clear_message(data_dir, tmp_path):
    # the checkpoint's own tokenizer file is gone, so the data directory's is used, which is not the same
    foreign = tiny_checkpoint(tmp_path / "pretrain.pt", data_dir, "pretrain", tokenizer_fingerprint="0123456789abcdef",
                              tokenizer_path=str(tmp_path / "gone" / "tokenizer.json"))
    r = run("sft", data_dir, tmp_path, foreign, "--max_steps", "2", check=False)
    assert r.returncode != 0
    assert "another tokenizer" in r.stderr and "0123456789abcdef" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("stage", SCRIPTS)
def test_resume_reproduces_the_uninterrupted_run_exactly(stage, data_dir, init_ckpts, tmp_path):
    # A constant LR after warmup (min_lr_ratio 1), so a run stopped at step 4 has had the same
    # schedule as the first half of the 8-step run; everything else must come from the checkpoint.
    flags = ["--eval_interval", "4", "--min_lr_ratio", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(stage, data_dir, straight, init_ckpts[stage], *flags, "--max_steps", "8")
    run(stage, data_dir, split, init_ckpts[stage], *flags, "--max_steps", "4")
    r = run(stage, data_dir, split, init_ckpts[stage], *flags, "--max_steps", "8", "--resume")
    assert "resumed" in r.stdout and "at step 4" in r.stdout
    a, b = metrics(straight, stage), metrics(split, stage)
    assert set(a) == set(b) == {0, *range(1, 9)}
    for step in a:
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    assert torch.load(split / f"{stage}.pt", weights_only=True)["step"] == 8


@pytest.mark.parametrize("stage", SCRIPTS)
def test_two_process_gloo_run_trains_and_writes_a_checkpoint(stage, data_dir, init_ckpts, tmp_path):
    r = run(stage, data_dir, tmp_path, init_ckpts[stage], "--max_steps", "3", "--eval_interval", "3", nproc=2)
    ckpt = torch.load(tmp_path / f"{stage}.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and ckpt["stage"] == stage
    assert ckpt["muon_opt"]["state"], "DistMuon's gathered state is saved"
    rows = metrics(tmp_path, stage)
    assert "answer_acc" in rows[3] and math.isfinite(rows[3]["val_loss"]), r.stdout[-2000:]


@pytest.mark.parametrize("stage", SCRIPTS)
def test_fsdp_run_evaluates_like_the_one_process_run(stage, data_dir, init_ckpts, tmp_path):
    # the evaluations (val loss, answers, preferences) deal their batches to ranks; under FSDP every forward is
    # collective, so every rank evaluates all of them: at step 0 (the same weights) the one-process figures
    flags = ["--max_steps", "2", "--eval_interval", "2", "--batch_size", "2"]
    run(stage, data_dir, tmp_path / "one", init_ckpts[stage], *flags)
    run(stage, data_dir, tmp_path / "fsdp", init_ckpts[stage], *flags, "--fsdp", nproc=2)
    a, b = metrics(tmp_path / "one", stage)[0], metrics(tmp_path / "fsdp", stage)[0]
    assert a["answer_acc"] == b["answer_acc"]
    for key in ("val_loss", "pref_acc", "val_reward_acc"):
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert torch.load(tmp_path / "fsdp" / f"{stage}.pt", weights_only=True)["step"] == 2


def test_sft_logs_val_bits_per_byte_of_the_assistant_text(data_dir, init_ckpts, tmp_path):
    run("sft", data_dir, tmp_path, init_ckpts["sft"], "--max_steps", "4", "--eval_interval", "2")
    rows = metrics(tmp_path, "sft")
    # nats per token over bits per byte is ln 2 times the val set's bytes per assistant token: one constant
    ratios = [rows[s]["val_loss"] / rows[s]["val_bpb"] / math.log(2) for s in (0, 2, 4)]
    assert 1 < ratios[0] < 10 and max(ratios) - min(ratios) < 1e-4 * ratios[0], ratios
    assert rows[4]["val_bpb"] < rows[0]["val_bpb"]


@pytest.mark.parametrize("stage", SCRIPTS)
def test_data_too_long_for_the_models_context_names_a_fix_this_stage_accepts(stage, data_dir, init_ckpts, tmp_path):
    # the model's max_seq_len (160 here) comes from --init_from; this stage refuses another --max_seq_len
    prompt = "Tell me about the red fox and the blue bird. " * 40
    if stage == "sft":
        records = [{"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Red."}]}]
    else:
        records = [{"prompt": prompt, "chosen": "Red.", "rejected": "Blue."}]
    path = tmp_path / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    r = run(stage, str(path), tmp_path / "out", init_ckpts[stage], "--val_path", str(path), "--max_steps", "2",
            check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "max_seq_len=160" in errors[0] and "pretrained with a longer" in errors[0], errors[0]
    assert "--max_seq_len" not in errors[0], errors[0]  # a flag this stage would refuse: the model's shape is fixed
    assert not os.path.exists(tmp_path / "out" / f"{stage}.pt")


# ------------------------------------------------------------------------------- the chat data of a stage

def test_split_val_of_fewer_than_two_records_raises_a_data_error_naming_the_fix():
    with pytest.raises(DataError, match="--val_path"):
        split_val([{"conversations": []}], seed=0)


def test_split_val_holds_out_a_seeded_share_and_keeps_every_record_once():
    records = list(range(100))
    train, val = split_val(records, seed=3)
    assert len(val) == 2 and sorted(train + val) == records
    assert split_val(records, seed=3) == (train, val) and split_val(records, seed=4)[1] != val


def test_a_chat_data_directory_without_the_stages_file_raises_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no dpo_train.jsonl"):
        resolve_chat_data("dpo", str(tmp_path), rank=0, world_size=1)
    with pytest.raises(DataError, match="no such file"):
        resolve_chat_data("sft", str(tmp_path / "nope.jsonl"), rank=0, world_size=1)


def test_answer_questions_leaves_out_and_counts_prompts_with_no_room_for_a_reply(data_dir, tmp_path):
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    question = {"conversations": [{"role": "user", "content": "Is red a colour?"},
                                  {"role": "assistant", "content": "Yes."}], "answer": "yes", "choices": ["yes", "no"]}
    long = dict(question, conversations=[{"role": "user", "content": "Is red a colour? " * 40},
                                         {"role": "assistant", "content": "Yes."}])
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in (question, long, question)))
    questions, used, left_out = answer_questions(str(path), None, tok, max_seq_len=64, n=10)
    assert (len(questions), used, left_out) == (2, str(path), 1)
    path.write_text(json.dumps({"conversations": question["conversations"]}) + "\n")
    with pytest.raises(DataError, match="answer"):
        answer_questions(str(path), None, tok, max_seq_len=64, n=10)


@pytest.mark.parametrize("stage", SCRIPTS)
def test_a_data_directory_without_the_stages_file_stops_the_script_with_one_error(stage, data_dir, init_ckpts,
                                                                                  tmp_path):
    r = run(stage, str(tmp_path), tmp_path / "out", init_ckpts[stage], "--max_steps", "2", check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and f"no {stage}_train.jsonl" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
