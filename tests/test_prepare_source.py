"""data/cache.py's prepare_source: raw pretraining text is prepared once per source (absolute
path and bytes) and settings, reused only when all of them match, and never written over
another source's directory."""
import hashlib
import json
import os

import pytest

from data import cache, prepare
from data.readers import DataError

SMALL = dict(vocab_size=300, quiet=True)


def _text(path, seed, n_docs=60):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(f"Story {seed}-{i}: Mia has {i * seed % 97} red kites." for i in range(n_docs)))
    return str(path)


def _meta(out):
    return json.load(open(os.path.join(out, "meta.json")))


def _snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def test_the_same_file_is_prepared_once_then_reused(tmp_path, monkeypatch):
    src, root = _text(tmp_path / "a" / "corpus.txt", 1), str(tmp_path / "prepared")
    out = cache.prepare_source(src, root, **SMALL)
    monkeypatch.setattr(prepare, "_staged", lambda *a, **k: pytest.fail("prepared twice"))
    assert cache.prepare_source(src, root, **SMALL) == out


def test_reuse_says_which_directory_and_why(tmp_path, capsys):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    out = cache.prepare_source(src, root, vocab_size=300)
    capsys.readouterr()
    cache.prepare_source(src, root, vocab_size=300)
    assert f"using {out}, prepared from {os.path.realpath(src)} (same content" in capsys.readouterr().out


def test_the_directory_name_is_the_stem_and_eight_hex_digits(tmp_path):
    out = cache.prepare_source(_text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared"), **SMALL)
    stem, digits = os.path.basename(out).rsplit("-", 1)
    assert stem == "corpus" and len(digits) == 8 and int(digits, 16) >= 0


def test_another_file_of_the_same_name_gets_its_own_directory(tmp_path):
    root = str(tmp_path / "prepared")
    first = cache.prepare_source(_text(tmp_path / "a" / "corpus.txt", 1), root, **SMALL)
    second = cache.prepare_source(_text(tmp_path / "b" / "corpus.txt", 2), root, **SMALL)
    assert first != second
    assert _meta(second)["source"]["pretrain"]["path"] == str(tmp_path / "b" / "corpus.txt")


def test_the_same_bytes_at_another_path_get_their_own_directory(tmp_path):
    root = str(tmp_path / "prepared")
    first = cache.prepare_source(_text(tmp_path / "a" / "corpus.txt", 1), root, **SMALL)
    assert cache.prepare_source(_text(tmp_path / "b" / "corpus.txt", 1), root, **SMALL) != first


def test_a_txt_and_a_jsonl_of_the_same_stem_do_not_share_a_directory(tmp_path):
    root = str(tmp_path / "prepared")
    txt = cache.prepare_source(_text(tmp_path / "good.txt", 1), root, **SMALL)
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": f"Tom ran {i} laps."}) + "\n" for i in range(60)))
    jsonl = cache.prepare_source(str(tmp_path / "good.jsonl"), root, **SMALL)
    assert jsonl != txt and _meta(jsonl)["source"]["pretrain"]["path"].endswith("good.jsonl")


def test_an_edited_file_is_prepared_afresh(tmp_path):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    before = cache.prepare_source(src, root, **SMALL)
    _text(tmp_path / "corpus.txt", 3)
    after = cache.prepare_source(src, root, **SMALL)
    assert after != before
    assert _meta(after)["source"]["pretrain"]["sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()


def test_the_directory_of_the_earlier_content_is_kept_untouched(tmp_path):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    before = cache.prepare_source(src, root, **SMALL)
    kept = _snapshot(before)
    _text(tmp_path / "corpus.txt", 3)
    cache.prepare_source(src, root, **SMALL)
    assert _snapshot(before) == kept


def test_an_edit_that_keeps_size_and_mtime_is_still_noticed(tmp_path):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    stat = os.stat(src)
    before = cache.prepare_source(src, root, **SMALL)
    data = bytearray(open(src, "rb").read())
    data[data.index(b"Mia")] = ord("P")  # "Pia": same size
    open(src, "wb").write(data)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(src) == stat.st_size and os.stat(src).st_mtime_ns == stat.st_mtime_ns
    assert cache.prepare_source(src, root, **SMALL) != before


def test_a_file_changed_inside_a_folder_source_is_noticed(tmp_path):
    folder, root = tmp_path / "texts", str(tmp_path / "prepared")
    _text(folder / "a.txt", 1)
    _text(folder / "b.txt", 2)
    before = cache.prepare_source(str(folder), root, **SMALL)
    _text(folder / "b.txt", 3)
    after = cache.prepare_source(str(folder), root, **SMALL)
    assert after != before and os.path.basename(after).startswith("texts-")


def test_other_settings_are_prepared_separately(tmp_path):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    small = cache.prepare_source(src, root, **SMALL)
    larger = cache.prepare_source(src, root, vocab_size=320, quiet=True)
    assert larger != small and _meta(larger)["source"]["vocab_size"] == 320


def test_a_directory_of_that_name_holding_other_data_is_never_overwritten(tmp_path):
    src, root = _text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared")
    first = cache.prepare_source(src, root, **SMALL)
    other = _text(tmp_path / "other.txt", 2)
    # the directory the source maps to now holds another source's data
    prepare.prepare_files(first, pretrain_path=other, vocab_size=300, quiet=True)
    theirs = _snapshot(first)
    again = cache.prepare_source(src, root, **SMALL)
    assert again != first and os.path.basename(again).startswith(os.path.basename(first))
    assert _snapshot(first) == theirs


def test_an_unsupported_extension_stops_listing_the_accepted_ones(tmp_path):
    (tmp_path / "good.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"good\.csv: unsupported file type.*\.txt, \.jsonl, \.parquet"):
        cache.prepare_source(str(tmp_path / "good.csv"), str(tmp_path / "prepared"), **SMALL)
    assert not (tmp_path / "prepared").exists()


def test_a_folder_with_files_of_other_kinds_stops_naming_them_before_anything_is_prepared(tmp_path):
    _text(tmp_path / "corpus" / "part1.txt", 1)
    (tmp_path / "corpus" / "part2.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    (tmp_path / "corpus" / "part3.json").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"corpus: 2 file\(s\) are not pretraining text.*part2\.jsonl\.gz, part3\.json"):
        cache.prepare_source(str(tmp_path / "corpus"), str(tmp_path / "prepared"), **SMALL)
    assert not (tmp_path / "prepared").exists()


def test_a_folder_reached_through_a_symlinked_subfolder_is_prepared_with_it(tmp_path):
    _text(tmp_path / "corpus" / "part1.txt", 1)
    _text(tmp_path / "elsewhere" / "part2.txt", 2)
    (tmp_path / "corpus" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out = cache.prepare_source(str(tmp_path / "corpus"), str(tmp_path / "prepared"), **SMALL)
    assert _meta(out)["train_docs"] + _meta(out)["val_docs"] >= 120  # both files' 60 documents


def test_a_failed_prepare_leaves_nothing_behind(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        cache.prepare_source(str(tmp_path / "bad.jsonl"), str(tmp_path / "prepared"), **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_a_prepared_directory_is_used_as_it_is(tmp_path, monkeypatch):
    out = cache.prepare_source(_text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared"), **SMALL)
    monkeypatch.setattr(cache, "source_identity", lambda *a, **k: pytest.fail("hashed a prepared directory"))
    assert cache.prepare_source(out, str(tmp_path / "elsewhere"), **SMALL) == out


def test_no_data_path_means_the_embedded_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "ensure_prepared", lambda out_dir: f"embedded at {out_dir}")
    assert cache.prepare_source(None, str(tmp_path), embedded_dir="emb") == "embedded at emb"


def test_an_unknown_setting_is_refused(tmp_path):
    with pytest.raises(TypeError):
        cache.prepare_source(_text(tmp_path / "corpus.txt", 1), str(tmp_path / "prepared"), vocab=300)
