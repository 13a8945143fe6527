"""Specification of how preparing data fails: a full disk, an unwritable folder, or a stop signal
(Ctrl-C, SIGTERM, SIGHUP) ends in one `error:` line and a non-zero exit, removes the staging
folder and leaves the output folder as it was; a staging folder that a killed process left is
removed by the next preparation and never read as data."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, run_main, script_env
from data import cache, prepare
from data.readers import DataError

SMALL = dict(vocab_size=300, quiet=True)


def _text(path, n_docs=60):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(f"Story {i}: Mia has {i * 7 % 97} red kites." for i in range(n_docs)))
    return str(path)


def _snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def _one_error(r):
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip() == errors[0], r.stderr[-3000:]
    return errors[0]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# a full disk, an unwritable folder


def _disk_full_while_splitting(monkeypatch):
    def full(stream, out, n_val, tok):
        with open(os.path.join(out, "train.bin"), "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "_split_off_val", full)


def test_a_full_disk_is_one_line_and_leaves_no_staging_folder(tmp_path, monkeypatch):
    src = _text(tmp_path / "corpus.txt")
    _disk_full_while_splitting(monkeypatch)
    r = run_main("data/prepare.py", "--pretrain_path", src, "--out_dir", str(tmp_path / "out"), "--vocab_size", "300")
    line = _one_error(r)
    assert "no space left" in line and "free some space" in line
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


def test_a_full_disk_leaves_an_existing_prepared_directory_byte_identical(tmp_path, monkeypatch):
    out = prepare.prepare_files(str(tmp_path / "out"), pretrain_path=_text(tmp_path / "a.txt"), **SMALL)
    before = _snapshot(out)
    _disk_full_while_splitting(monkeypatch)
    with pytest.raises(DataError, match="no space left"):
        prepare.prepare_files(out, pretrain_path=_text(tmp_path / "b.txt", 80), **SMALL)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "out"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_folder_is_one_line(tmp_path, monkeypatch, code):
    def refused(prefix, dir):  # root writes anywhere; refuse as a read-only mount or a user's folder would
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix))

    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix, dir: refused(prefix, dir))
    r = run_main("data/prepare.py", "--pretrain_path", _text(tmp_path / "a.txt"), "--out_dir",
                 str(tmp_path / "ro" / "out"), "--vocab_size", "300")
    line = _one_error(r)
    assert f"{tmp_path / 'ro'}: cannot write there ({os.strerror(code)})" in line and "--out_dir" in line
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]  # the parent it made is gone again


def test_an_unwritable_prepared_root_stops_a_data_path_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix, dir: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix))))
    with pytest.raises(DataError, match=r"prepared: cannot write there \(Read-only file system\).*--data_path"):
        cache.prepare_source(_text(tmp_path / "a.txt"), str(tmp_path / "prepared"), **SMALL)


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("my notes")
    r = run_main("data/prepare.py", "--pretrain_path", _text(tmp_path / "a.txt"), "--out_dir", str(tmp_path / "out"),
                 "--vocab_size", "300")
    assert "out: exists and is not a directory" in _one_error(r)
    assert (tmp_path / "out").read_text() == "my notes"


def test_an_output_folder_that_is_the_raw_text_folder_is_refused(tmp_path):
    src = tmp_path / "corpus"
    _text(src / "a.txt")
    r = run_main("data/prepare.py", "--pretrain_path", str(src), "--out_dir", str(src), "--vocab_size", "300")
    assert "corpus: is the folder of raw text itself" in _one_error(r)
    assert sorted(os.listdir(src)) == ["a.txt"]


def test_pretraining_on_a_folder_with_files_of_other_kinds_stops_naming_them(tmp_path):
    _text(tmp_path / "corpus" / "a.txt")
    (tmp_path / "corpus" / "b.txt.gz").write_bytes(b"\x1f\x8b\x08\x00")
    r = run_main("train_pretrain_muon.py", "--data_path", str(tmp_path / "corpus"), "--out_dir", str(tmp_path / "out"),
                 "--max_steps", "1")
    line = _one_error(r)
    assert "corpus: 1 file(s) are not pretraining text" in line and "b.txt.gz" in line and "gunzip" in line
    assert not (tmp_path / "out" / "pretrain.pt").exists()


def test_an_unreadable_embedded_meta_json_is_one_message(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: unreadable .*delete"):
        cache.ensure_prepared(str(out))


# ---------------------------------------------------------------------------------------------
# stop signals

# a preparation whose step `slow` (tokenizer training by default) is made to wait, as on a large
# corpus, once it says "staging"
SLOW_PREPARE = """
import sys, time
sys.path.insert(0, {root!r})
from data import cache, prepare
def slow(*args, **kwargs):
    print("staging", flush=True)
    time.sleep(120)
{slow} = slow
{call}
"""


def _signalled(tmp_path, sig, call, slow="prepare._get_tokenizer"):
    code = SLOW_PREPARE.format(root=ROOT, call=call, slow=slow)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "staging"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_preparing_removes_the_staging_folder_and_says_so(tmp_path, sig):
    src = _text(tmp_path / "corpus.txt")
    r = _signalled(tmp_path, sig, f"prepare.main(['--pretrain_path', {src!r}, '--out_dir', 'out'])")
    line = _one_error(r)
    assert r.returncode == 128 + sig
    assert line == (f"error: {signal.Signals(sig).name} while preparing {tmp_path / 'out'}: stopped; its staging "
                    f"folder is removed and {tmp_path / 'out'} is as it was")
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


def test_sigterm_while_preparing_an_existing_directory_leaves_it_byte_identical(tmp_path):
    out = prepare.prepare_files(str(tmp_path / "out"), pretrain_path=_text(tmp_path / "a.txt"), **SMALL)
    before = _snapshot(out)
    src = _text(tmp_path / "b.txt", 80)
    r = _signalled(tmp_path, signal.SIGTERM, f"prepare.main(['--pretrain_path', {src!r}, '--out_dir', 'out'])")
    assert "SIGTERM while preparing" in _one_error(r)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "out"]


def test_sigterm_while_a_data_path_is_prepared_is_a_data_error_the_scripts_print(tmp_path):
    # the stage scripts turn every DataError into their one `error:` line
    src = _text(tmp_path / "corpus.txt")
    call = (f"from data.readers import DataError\n"
            f"try:\n    cache.prepare_source({src!r}, 'prepared', vocab_size=300, quiet=True)\n"
            f"except DataError as e:\n    print('error:', e, file=sys.stderr)\n    sys.exit(1)")
    r = _signalled(tmp_path, signal.SIGTERM, call)
    assert "SIGTERM while preparing" in _one_error(r)
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


def test_sigint_while_a_data_path_is_hashed_is_a_data_error_too(tmp_path):
    src = _text(tmp_path / "corpus.txt")
    call = (f"from data.readers import DataError\n"
            f"try:\n    cache.prepare_source({src!r}, 'prepared', vocab_size=300, quiet=True)\n"
            f"except DataError as e:\n    print('error:', e, file=sys.stderr)\n    sys.exit(1)")
    r = _signalled(tmp_path, signal.SIGINT, call, slow="cache.source_identity")
    assert _one_error(r) == "error: SIGINT: stopped before anything was written"
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


# ---------------------------------------------------------------------------------------------
# what a killed process leaves


def test_a_staging_folder_left_by_a_killed_process_is_removed_by_the_next_preparation(tmp_path, capsys):
    stale = tmp_path / f".out.tmp-{socket.gethostname()}-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 1000)
    out = prepare.prepare_files(str(tmp_path / "out"), pretrain_path=_text(tmp_path / "a.txt"), vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "out"]
    assert f"removed {stale}, left by a preparation that was killed" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "meta.json")))["train_tokens"] > 0


def test_staging_folders_of_running_processes_and_other_hosts_are_left_alone(tmp_path):
    live = tmp_path / f".out.tmp-{socket.gethostname()}-{os.getpid()}-abc123"
    other_host = tmp_path / f".out.tmp-elsewhere.example-{_dead_pid()}-abc123"
    live.mkdir()
    other_host.mkdir()
    prepare.prepare_files(str(tmp_path / "out"), pretrain_path=_text(tmp_path / "a.txt"), **SMALL)
    assert live.is_dir() and other_host.is_dir()


def test_a_complete_staging_folder_is_never_taken_for_an_earlier_preparation(tmp_path, capsys):
    # killed between writing meta.json into the staging folder and moving it into place
    src, root = _text(tmp_path / "a.txt"), tmp_path / "prepared"
    staged = cache.prepare_source(src, str(root), **SMALL)
    os.rename(staged, root / f".{os.path.basename(staged)}.tmp-elsewhere-1-abc")
    cache.prepare_source(src, str(root), vocab_size=300)
    assert "was prepared from an earlier version" not in capsys.readouterr().out


def test_a_killed_preparation_leaves_nothing_the_next_run_reads_or_keeps(tmp_path):
    src = _text(tmp_path / "corpus.txt")
    code = SLOW_PREPARE.format(root=ROOT, call=f"prepare.main(['--pretrain_path', {src!r}, '--out_dir', 'out'])",
                               slow="prepare._get_tokenizer")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "staging"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # SIGKILL runs no clean-up
    r = run_main("data/prepare.py", "--pretrain_path", src, "--out_dir", str(tmp_path / "out"), "--vocab_size", "300")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "out"]


# ---------------------------------------------------------------------------------------------
# a prepared directory whose tokenizer.json was swapped


@pytest.fixture(scope="module")
def two_vocabularies(tmp_path_factory):
    """Two directories prepared from one text with tokenizers of 300 and 400 tokens."""
    root = tmp_path_factory.mktemp("vocab")
    words = " ".join(f"{w}{i}" for i in range(40) for w in ("kite", "hill", "river", "lantern"))
    src = root / "corpus.txt"
    src.write_text("\n\n".join(f"Story {i}: {words[i % 50:]}" for i in range(300)))
    dirs = {n: prepare.prepare_files(str(root / f"v{n}"), pretrain_path=str(src), vocab_size=n, quiet=True)
            for n in (300, 400)}
    assert [json.load(open(os.path.join(d, "meta.json")))["vocab_size"] for d in dirs.values()] == [300, 400]
    return dirs


@pytest.mark.parametrize("data_vocab, tokenizer_vocab", [(300, 400), (400, 300)])
def test_pretraining_on_tokens_of_another_tokenizer_stops_naming_the_directory(two_vocabularies, tmp_path,
                                                                              data_vocab, tokenizer_vocab):
    data = tmp_path / "data"
    shutil.copytree(two_vocabularies[data_vocab], data)
    shutil.copy(os.path.join(two_vocabularies[tokenizer_vocab], "tokenizer.json"), data / "tokenizer.json")
    before = _snapshot(data)
    r = run_main("train_pretrain_muon.py", "--data_path", str(data), "--out_dir", str(tmp_path / "out"),
                 "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                 "--num_key_value_heads", "1", "--max_seq_len", "32", "--batch_size", "2", "--eval_iters", "1",
                 "--max_steps", "1", "--sample_prompt", "")
    line = _one_error(r)
    assert f"{data}: its token files were written by another tokenizer" in line and "prepare" in line
    assert _snapshot(data) == before and not os.path.exists(tmp_path / "out" / "pretrain.pt")
