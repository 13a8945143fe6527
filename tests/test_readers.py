"""Readers for real data: accepted formats, and one clear DataError (file:line) per bad input."""
import importlib.util
import json
import os
import sys

import pytest

from data.readers import DataError, read_dpo_jsonl, read_pretrain_texts, read_sft_jsonl

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _convo(answer="It is red."):
    return [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------------------------
# pretraining text


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc line one\nline two\n\n\n  \nsecond doc\n\nthird doc", encoding="utf-8")
    assert list(read_pretrain_texts(str(p))) == ["first doc line one\nline two", "second doc", "third doc"]


def test_jsonl_text_records_skip_blank_lines(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, "", {"text": "two ✓"}])
    assert list(read_pretrain_texts(p)) == ["one", "two ✓"]


def test_directory_reads_supported_files_in_sorted_order_skipping_hidden(tmp_path):
    _jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    (tmp_path / "a.txt").write_text("from a", encoding="utf-8")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "part.txt").write_text("from c/part", encoding="utf-8")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("hidden", encoding="utf-8")
    assert list(read_pretrain_texts(str(tmp_path))) == ["from a", "from b", "from c/part"]


def test_parquet_text_column_is_read(tmp_path):
    assert HAS_PYARROW, "pyarrow is in requirements.txt"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["doc one", "doc two"], "n": [1, 2]}), tmp_path / "a.parquet")
    assert list(read_pretrain_texts(str(tmp_path / "a.parquet"))) == ["doc one", "doc two"]


def test_parquet_without_pyarrow_says_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"a\.parquet.*pip install pyarrow"):
        read_pretrain_texts(str(tmp_path / "a.parquet"))


def _pretrain_error(path):
    with pytest.raises(DataError) as e:
        list(read_pretrain_texts(path))
    return str(e.value)


def test_pretrain_missing_path_is_an_error(tmp_path):
    assert "no such file" in _pretrain_error(str(tmp_path / "missing.txt"))


def test_pretrain_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    assert "e.jsonl: file is empty" in _pretrain_error(str(tmp_path / "e.jsonl"))


def test_pretrain_only_blank_lines_is_no_usable_records(tmp_path):
    (tmp_path / "b.txt").write_text("\n\n   \n")
    assert "b.txt: no usable records" in _pretrain_error(str(tmp_path / "b.txt"))


def test_pretrain_unsupported_extension_is_an_error(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    assert "a.csv: unsupported file type; pretraining text must be a .txt, .jsonl, .parquet file" in \
        _pretrain_error(str(tmp_path / "a.csv"))


def test_pretrain_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "", '{"text": "broken'])
    assert "a.jsonl:3: malformed JSON" in _pretrain_error(p)


def test_pretrain_jsonl_missing_text_key_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"content": "x"}])
    assert "a.jsonl:2: missing key 'text'" in _pretrain_error(p)


def test_pretrain_jsonl_of_dpo_records_says_it_is_dpo_data(tmp_path):
    p = _jsonl(tmp_path / "dpo_train.jsonl", [{"chosen": _convo(), "rejected": _convo("Blue.")}])
    assert "dpo_train.jsonl:1: missing key 'text' (this is DPO data, not pretraining text)" in _pretrain_error(p)


def test_pretrain_jsonl_of_sft_records_says_it_is_sft_data(tmp_path):
    p = _jsonl(tmp_path / "chat.jsonl", [{"messages": _convo()}])
    assert "(this is SFT data, not pretraining text)" in _pretrain_error(p)


def test_pretrain_folder_without_data_files_is_neither_prepared_nor_raw_text(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "docs.gz").write_bytes(b"\x1f\x8b\x08\x00")
    msg = _pretrain_error(str(tmp_path))
    assert "neither a prepared data directory (no meta.json) nor a folder of .txt, .jsonl, .parquet" in msg
    assert "docs.gz, notes.md" in msg


def test_pretrain_folder_with_files_of_other_kinds_names_them_instead_of_skipping_them(tmp_path):
    (tmp_path / "a.txt").write_text("read")
    (tmp_path / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "c.json", [{"text": "one object per line"}])
    msg = _pretrain_error(str(tmp_path))
    assert "2 file(s) are not pretraining text, which is read from .txt, .jsonl, .parquet files only" in msg
    assert "b.jsonl.gz, sub/c.json" in msg
    assert "gunzip" in msg and "is a .jsonl file: rename it" in msg


def test_pretrain_folder_lists_at_most_five_other_files_and_counts_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("read")
    for i in range(8):
        (tmp_path / f"part{i}.csv").write_text("x")
    assert "part0.csv, part1.csv, part2.csv, part3.csv, part4.csv and 3 more" in _pretrain_error(str(tmp_path))


def test_pretrain_folder_reads_upper_case_suffixes(tmp_path):
    (tmp_path / "A.TXT").write_text("shouting")
    _jsonl(tmp_path / "b.JSONL", [{"text": "also read"}])
    assert list(read_pretrain_texts(str(tmp_path))) == ["shouting", "also read"]


def test_pretrain_folder_follows_a_symlinked_subfolder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("through the link")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("direct")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert list(read_pretrain_texts(str(tmp_path / "corpus"))) == ["direct", "through the link"]


def test_pretrain_folder_with_a_symlink_cycle_reads_each_file_once(tmp_path):
    (tmp_path / "a.txt").write_text("once")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("also once")
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "sub" / "again.txt").symlink_to(tmp_path / "a.txt")
    assert sorted(read_pretrain_texts(str(tmp_path))) == ["also once", "once"]


def test_pretrain_folder_with_a_broken_symlink_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    assert "gone.txt: a symbolic link to" in _pretrain_error(str(tmp_path))


def test_pretrain_folder_holding_a_prepared_directory_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("raw")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "meta.json").write_text("{}")
    (tmp_path / "prepared" / "sft_train.jsonl").write_text("{}\n")
    assert "prepared: a prepared data directory inside the folder of raw text" in _pretrain_error(str(tmp_path))


def test_pretrain_folder_with_a_subfolder_it_cannot_list_names_it(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("unseen")
    scandir = os.scandir

    def denied(path="."):  # root may list any folder; fail as a user would
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert "locked: cannot list this folder (Permission denied)" in _pretrain_error(str(tmp_path))


def test_pretrain_unreadable_file_names_it(tmp_path, monkeypatch):
    from data import readers

    (tmp_path / "a.txt").write_text("secret")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(readers, "open", denied, raising=False)  # root may read any file; fail as a user would
    assert "a.txt: cannot be read (Permission denied)" in _pretrain_error(str(tmp_path / "a.txt"))


def test_pretrain_gzip_file_named_as_text_says_to_decompress_it(tmp_path):
    import gzip

    (tmp_path / "a.jsonl").write_bytes(gzip.compress(b'{"text": "packed"}\n'))
    assert "a.jsonl: is gzip-compressed; decompress it first" in _pretrain_error(str(tmp_path / "a.jsonl"))


def test_pretrain_jsonl_lone_surrogate_names_file_line_and_key(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, '{"text": "bad \\ud800 here"}'])
    msg = _pretrain_error(p)
    assert "a.jsonl:2: a lone UTF-16 surrogate" in msg and "in 'text'" in msg and "fix or remove" in msg


def test_pretrain_jsonl_surrogate_pair_is_one_character(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", ['{"text": "smile \\ud83d\\ude00"}'])
    assert list(read_pretrain_texts(p)) == ["smile \U0001F600"]


def test_pretrain_jsonl_that_python_cannot_parse_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "[" * 100_000, '{"text": ' + "1" * 5000 + "}"])
    assert "a.jsonl:2: JSON that Python cannot read (nested too deeply)" in _pretrain_error(p)
    p = _jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, '{"text": ' + "1" * 5000 + "}"])
    assert "b.jsonl:2: JSON that Python cannot read" in _pretrain_error(p)


def test_parquet_that_is_not_parquet_names_the_file(tmp_path):
    assert HAS_PYARROW, "pyarrow is in requirements.txt"
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really a parquet file")
    assert "a.parquet: cannot read as parquet" in _pretrain_error(str(tmp_path / "a.parquet"))


def test_parquet_without_a_text_column_names_the_columns(tmp_path):
    assert HAS_PYARROW, "pyarrow is in requirements.txt"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["doc"]}), tmp_path / "a.parquet")
    assert "a.parquet: no 'text' column (columns: content)" in _pretrain_error(str(tmp_path / "a.parquet"))


def test_pretrain_folder_of_prepared_files_without_meta_json_says_so(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0\0")
    _jsonl(tmp_path / "dpo_train.jsonl", [{"chosen": _convo(), "rejected": _convo("Blue.")}])
    msg = _pretrain_error(str(tmp_path))
    assert "looks like a prepared data directory (train.bin, dpo_train.jsonl) but has no meta.json" in msg
    assert "missing key" not in msg


def test_pretrain_prepared_folder_with_meta_json_is_not_raw_text(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "a.txt").write_text("text")
    assert "is a prepared data directory (it has meta.json), not raw text" in _pretrain_error(str(tmp_path))


def test_pretrain_jsonl_text_not_a_string_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": ["x"]}])
    assert "a.jsonl:1: 'text' must be a string" in _pretrain_error(p)


def test_pretrain_non_utf8_bytes_name_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\n\nalso fine\n\xff\xfe bad\n")
    assert "a.txt:4: not valid UTF-8" in _pretrain_error(str(tmp_path / "a.txt"))


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_minimind_conversations_format_keeps_other_keys(tmp_path):
    p = _jsonl(tmp_path / "s.jsonl", [{"conversations": _convo(), "answer": "red"}])
    assert read_sft_jsonl(p) == [{"conversations": _convo(), "answer": "red"}]


def test_sft_hf_messages_format_becomes_conversations(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}] + _convo()
    p = _jsonl(tmp_path / "s.jsonl", [{"messages": msgs, "id": 7}, ""])
    assert read_sft_jsonl(p) == [{"conversations": msgs, "id": 7}]


SFT_BAD = {
    "malformed_json": ('{"conversations": [', "s.jsonl:2: malformed JSON"),
    "not_an_object": ("[1, 2]", "s.jsonl:2: expected a JSON object"),
    "missing_key": ({"dialog": _convo()}, "s.jsonl:2: missing key 'conversations'"),
    "content_not_string": ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
                           "s.jsonl:2: conversations[1] content must be a string"),
    "message_missing_role": ({"messages": [{"content": "q"}]}, "s.jsonl:2: messages[0] must be an object with"),
    "unknown_role": ({"conversations": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
                     "s.jsonl:2: conversations[0] has unknown role 'human'"),
    "no_assistant_turn": ({"conversations": [{"role": "user", "content": "q"}]}, "s.jsonl:2: conversation has no assistant turn"),
    "empty_conversation": ({"conversations": []}, "s.jsonl:2: 'conversations' must be a non-empty list"),
    "lone_surrogate": ({"conversations": _convo("Red \ud800.")},
                       "s.jsonl:2: a lone UTF-16 surrogate .* in 'conversations[1].content'"),
    "lone_surrogate_in_a_kept_key": ({"conversations": _convo(), "id": "\udfff"}, "s.jsonl:2: a lone UTF-16 surrogate"),
}


@pytest.mark.parametrize("case", SFT_BAD)
def test_sft_bad_line_names_file_and_line(tmp_path, case):
    bad, expected = SFT_BAD[case]
    p = _jsonl(tmp_path / "s.jsonl", [{"conversations": _convo()}, bad, {"conversations": _convo()}])
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        read_sft_jsonl(p)


def test_sft_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_sft_jsonl(str(tmp_path / "nope.jsonl"))


def test_sft_empty_file_is_an_error(tmp_path):
    (tmp_path / "s.jsonl").write_text("")
    with pytest.raises(DataError, match="s.jsonl: file is empty"):
        read_sft_jsonl(str(tmp_path / "s.jsonl"))


def test_sft_file_of_blank_lines_has_no_usable_records(tmp_path):
    (tmp_path / "s.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="s.jsonl: no usable records"):
        read_sft_jsonl(str(tmp_path / "s.jsonl"))


def test_sft_non_utf8_bytes_name_file_and_line(tmp_path):
    good = json.dumps({"conversations": _convo()}).encode()
    (tmp_path / "s.jsonl").write_bytes(good + b"\n" + good.replace(b"red", b"r\xe9d") + b"\n")
    with pytest.raises(DataError, match="s.jsonl:2: not valid UTF-8"):
        read_sft_jsonl(str(tmp_path / "s.jsonl"))


# ---------------------------------------------------------------------------------------------
# DPO


def test_dpo_message_lists_format_keeps_other_keys(tmp_path):
    row = {"chosen": _convo("Red."), "rejected": _convo("Blue."), "answer": "red", "choices": ["red", "blue"]}
    assert read_dpo_jsonl(_jsonl(tmp_path / "d.jsonl", [row])) == [row]


def test_dpo_prompt_string_format_becomes_messages(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "id": 3}])
    assert read_dpo_jsonl(p) == [{"chosen": _convo("Red."), "rejected": _convo("Blue."), "id": 3}]


def test_dpo_prompt_messages_with_split_off_responses_are_joined(tmp_path):
    row = {"prompt": _convo()[:1], "chosen": _convo("Red.")[1:], "rejected": _convo("Blue.")[1:]}
    assert read_dpo_jsonl(_jsonl(tmp_path / "d.jsonl", [row])) == [{"chosen": _convo("Red."), "rejected": _convo("Blue.")}]


DPO_BAD = {
    "malformed_json": ('{"chosen": ', "d.jsonl:2: malformed JSON"),
    "missing_rejected": ({"chosen": _convo()}, "d.jsonl:2: missing key\\(s\\) 'rejected'"),
    "string_without_prompt": ({"chosen": "a", "rejected": "b"}, "d.jsonl:2: 'chosen' is a string, which needs a 'prompt'"),
    "content_not_string": ({"chosen": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}],
                            "rejected": _convo()}, "d.jsonl:2: chosen\\[0\\] content must be a string"),
    "unknown_role": ({"chosen": [{"role": "bot", "content": "a"}], "rejected": _convo()}, "d.jsonl:2: chosen\\[0\\] has unknown role 'bot'"),
    "ends_with_user": ({"chosen": _convo()[:1], "rejected": _convo()[:1]}, "d.jsonl:2: 'chosen' must end with an assistant turn"),
    "different_prompts": ({"chosen": _convo(), "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "x"}]},
                          "d.jsonl:2: 'chosen' and 'rejected' must share the same prompt"),
    "lone_surrogate": ({"prompt": "Colour?", "chosen": "Red \udc00", "rejected": "Blue."},
                       "d.jsonl:2: a lone UTF-16 surrogate .* in 'chosen'"),
}


@pytest.mark.parametrize("case", DPO_BAD)
def test_dpo_bad_line_names_file_and_line(tmp_path, case):
    bad, expected = DPO_BAD[case]
    good = {"chosen": _convo("Red."), "rejected": _convo("Blue.")}
    with pytest.raises(DataError, match=expected):
        read_dpo_jsonl(_jsonl(tmp_path / "d.jsonl", [good, bad]))


def test_dpo_empty_file_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(DataError, match="d.jsonl: file is empty"):
        read_dpo_jsonl(str(tmp_path / "d.jsonl"))
