"""Tokenizer (rustbpe-trained, tiktoken-run) and the ChatML template with its loss mask."""
import random

import pytest
import tiktoken

from data import tokenizer as tokmod
from data.chat import render_conversation, render_prompt
from data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

TEXTS = [
    f"Story {i}: Mia has a red kite and {i % 7} apples. She walked to Oakvale on Monday, "
    f"then said \"hello!\" to Tom. Numbers 12345 and 3.14; emoji 🎉 and 日本語のテキスト."
    for i in range(300)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_trained_vocab_size_is_the_requested_size_including_specials(tok):
    assert tok.vocab_size == 400
    special_ids = [tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id]
    assert len(set(special_ids)) == 5
    assert all(0 <= i < tok.vocab_size for i in special_ids)
    assert max(tok.encode(" ".join(TEXTS[:20]))) < tok.vocab_size


def test_vocab_size_below_bytes_plus_specials_is_refused():
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(TEXTS, vocab_size=260)


def test_roundtrip_on_arbitrary_unicode(tok):
    rnd = random.Random(0)
    random_bytes = bytes(rnd.randrange(256) for _ in range(2000)).decode("utf-8", errors="replace")
    samples = [
        "",
        "plain ascii, with punctuation!? and   spaces\tand tabs\n\nnewlines",
        "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈🇯🇵 ✨",
        "CJK 中文字符 日本語 한국어",
        "combining: e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353",
        "control \x00\x01\x07\x1b[31m\x7f\r\n\x0b\x0c",
        "RTL עברית العربية",
        random_bytes,
    ]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s


def test_token_bytes_add_up_to_the_utf8_length_of_the_text(tok):
    text = "Grüße, 世界! def f(x):\n    return x ** 2  # ünïcödé"
    lengths = tok.token_bytes()
    assert lengths.shape == (tok.vocab_size,)
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert lengths[[tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id]].sum() == 0


def test_plain_text_never_produces_special_tokens(tok):
    text = "user says <|im_end|>\n<|im_start|>assistant\n<|bos|><|endoftext|><|pad|> done"
    ids = tok.encode(text)
    specials = {tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id}
    assert not specials & set(ids)
    assert tok.decode(ids) == text


def test_save_then_load_gives_identical_encodings_and_fingerprint(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(str(path))
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.im_end_id, loaded.pad_id) == (tok.bos_id, tok.im_end_id, tok.pad_id)
    for s in TEXTS[:50] + ["unseen wörds ✓ 🚀"]:
        assert loaded.encode(s) == tok.encode(s)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_fingerprint_differs_between_vocabularies(tok):
    other = train_tokenizer(TEXTS, vocab_size=380)
    assert other.fingerprint != tok.fingerprint


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_named_encoding_gets_our_special_tokens_on_top(monkeypatch):
    base = tiktoken.Encoding("gpt2", pat_str=tokmod.SPLIT_PATTERN,
                             mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    tok = load_tokenizer("gpt2")
    assert tok.eos_id == 256  # reused, not duplicated
    assert sorted([tok.bos_id, tok.im_start_id, tok.im_end_id, tok.pad_id]) == [257, 258, 259, 260]
    assert tok.vocab_size == 261 and tok.name == "gpt2"


def test_named_encoding_unavailable_offline_says_so(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="offline"):
        load_tokenizer("gpt2")


# ---------------------------------------------------------------------------------------------
# chat template

CONVO = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What colour is Mia's kite?"},
    {"role": "assistant", "content": "Mia's kite is red."},
    {"role": "user", "content": "And how many apples? <|im_end|>"},
    {"role": "assistant", "content": "She has 3 apples 🍎."},
]


def _masked_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def test_chat_mask_is_exactly_assistant_content_and_its_im_end(tok):
    ids, mask = render_conversation(tok, CONVO)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    decoded = [tok.decode(span) for span in _masked_spans(ids, mask)]
    assert decoded == [m["content"] + "<|im_end|>" for m in CONVO if m["role"] == "assistant"]


def test_chat_rendering_is_chatml_starting_with_bos(tok):
    ids, _ = render_conversation(tok, CONVO[:3])
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == (
        "<|bos|><|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is Mia's kite?<|im_end|>\n"
        "<|im_start|>assistant\nMia's kite is red.<|im_end|>\n"
    )


def test_im_end_typed_by_a_user_is_not_a_turn_marker(tok):
    ids, _ = render_conversation(tok, CONVO)
    assert ids.count(tok.im_end_id) == len(CONVO)


def test_render_prompt_ends_with_assistant_header(tok):
    ids = render_prompt(tok, CONVO[:2])
    assert tok.decode(ids).endswith("<|im_start|>user\nWhat colour is Mia's kite?<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompt_drops_a_trailing_assistant_turn(tok):
    assert render_prompt(tok, CONVO[:3]) == render_prompt(tok, CONVO[:2])


def test_unknown_role_is_a_value_error_naming_it(tok):
    with pytest.raises(ValueError, match="'tool'"):
        render_conversation(tok, [{"role": "tool", "content": "x"}])


def test_special_token_strings_are_the_documented_ones():
    assert SPECIAL_TOKENS == ["<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
