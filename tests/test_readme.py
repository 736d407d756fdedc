"""Every train.py / infer.py command in the README uses flags that exist; make targets exist."""

import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands(script):
    text = README.replace("\\\n", " ")
    return [
        m.group(0)
        for m in re.finditer(rf"python {script}[^\n`#]*", text)
        if "--help" not in m.group(0)
    ]


@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_readme_commands_parse_with_the_real_parser(script):
    import infer
    import train

    parser = (train if script == "train.py" else infer).build_parser()
    found = commands(script)
    assert found, f"README shows no {script} command"
    for cmd in found:
        argv = shlex.split(cmd)[2:]
        args, unknown = parser.parse_known_args(argv)
        assert not unknown, f"{cmd!r}: unknown {unknown}"


def test_readme_flag_table_names_real_flags():
    import train

    known = {a for action in train.build_parser()._actions for a in action.option_strings}
    table_flags = set(re.findall(r"`(--[a-z-]+)`", README.split("## Main flags")[1].split("##")[0]))
    assert table_flags and table_flags <= known, table_flags - known


def test_make_targets_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"make ([\w-]+)", README)):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_the_reading_order_in_lora_names_every_file():
    import lora

    files = sorted(p.name for p in (ROOT / "lora").glob("*.py") if p.name != "__init__.py")
    assert [f for f in files if f"    {f} " not in lora.__doc__] == []
