"""README's commands run as written: every python/torchrun line in its bash blocks names a script
that exists and flags that script has, and the stage scripts accept the exact values. (Running the
commands is the pipeline tests' job; the GPU ones need a GPU.)"""
import functools
import os
import re
import shlex
import sys

import pytest

from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_SCRIPTS = ("train_pretrain_muon.py", "train_full_sft_muon.py", "train_dpo_muon.py")


def readme_commands() -> list[list[str]]:
    """Each python/torchrun command of README's ```bash blocks as argv, shell variables expanded."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            words = [w for word in words for w in (shlex.split(variables[word[1:]]) if word[1:] in variables else [word])]
            if words and words[0] in ("python", "torchrun") and words[1] != "-m":
                commands.append(words)
    return commands


def script_and_args(words: list[str]) -> tuple[str, list[str]]:
    i = next(i for i, w in enumerate(words) if w.endswith(".py"))  # torchrun's own flags come before
    return words[i], words[i + 1:]


@functools.lru_cache(maxsize=None)
def help_text(script: str) -> str:
    r = run_main(script, "--help")  # the script's main() in this process: argparse prints the help, exits 0
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


COMMANDS = readme_commands()


def test_readme_has_the_commands_a_user_runs_first():
    scripts = {script_and_args(c)[0] for c in COMMANDS}
    assert {*STAGE_SCRIPTS, "sample.py", "export_hf.py", "data/prepare.py"} <= scripts, scripts


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_each_readme_command_names_an_existing_script_and_its_flags(words):
    script, args = script_and_args(words)
    assert os.path.isfile(os.path.join(ROOT, script)), script
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", help_text(script))]
    assert not missing, f"{script} has no {missing}"


@pytest.mark.parametrize("words", [c for c in COMMANDS if script_and_args(c)[0] in STAGE_SCRIPTS],
                         ids=lambda c: " ".join(c)[:60])
def test_stage_commands_parse_with_their_values(words, monkeypatch):
    script, args = script_and_args(words)
    module = __import__(script[:-3])
    monkeypatch.setattr(sys, "argv", [script, *args])
    module.parse_args()  # argparse exits (status 2) on an unknown flag or an out-of-range value
