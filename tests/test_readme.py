"""The README and every page of docs/ say only what is true of the code: each train.py /
infer.py command parses with the real parser, each flag table names real flags, each make target
exists, each relative link and anchor points at something, and each `lora/` path exists."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def parser(script: str):
    import infer
    import train

    return (train if script == "train.py" else infer).build_parser()


def known_flags(script: str) -> set[str]:
    return {a for action in parser(script)._actions for a in action.option_strings}


def commands(text: str, script: str) -> list[str]:
    """`python train.py ...` and `torchrun ... train.py ...`, to the end of the line, the inline
    code span or a comment (continuation lines joined)."""
    text = text.replace("\\\n", " ")
    pattern = rf"(?:python|torchrun[^\n`#]*?) {re.escape(script)}(?: [^\n`#]*)?"
    return [m.group(0) for m in re.finditer(pattern, text) if "--help" not in m.group(0)]


def test_every_page_exists_and_the_readme_stays_short():
    assert len(PAGES) > 1, "docs/ has no pages"
    assert len(read(ROOT / "README.md").splitlines()) <= 300


@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_the_readme_shows_the_command(script):
    assert commands(read(ROOT / "README.md"), script), f"the README shows no {script} command"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_commands_parse_with_the_real_parser(page, script):
    p = parser(script)
    for cmd in commands(read(page), script):
        argv = shlex.split(cmd)
        argv = argv[argv.index(script) + 1 :]
        try:
            _, unknown = p.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: {cmd!r} does not parse")
        assert not unknown, f"{page.name}: {cmd!r}: unknown {unknown}"


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)


def flag_tables(text: str):
    """(script, first-column flags, every flag of the row) for each table row whose first
    column holds `--flag` names. A table is infer.py's when the nearest heading above it names
    infer.py, or an `<!-- flags: infer.py -->` comment precedes it; otherwise train.py's."""
    script, heading_script = None, "train.py"
    for line in without_code_blocks(text).splitlines():
        if line.startswith("#"):
            heading_script = "infer.py" if "infer.py" in line else "train.py"
            script = None
        elif m := re.match(r"<!-- flags: (train\.py|infer\.py) -->", line):
            script = m.group(1)
        elif line.startswith("|"):
            first = line.strip("|").split("|")[0]
            flags = re.findall(r"`(--[a-z0-9-]+)`", first)
            if flags:
                yield script or heading_script, flags, re.findall(r"`(--[a-z0-9-]+)`", line)
        elif line.strip() == "":
            continue
        else:
            script = script if line.startswith("<!--") else None


def test_the_main_flags_table_is_still_in_the_readme():
    section = read(ROOT / "README.md").split("## Main flags")[1].split("\n## ")[0]
    assert len(list(flag_tables(section))) >= 15


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_flag_tables_name_real_flags(page):
    both = known_flags("train.py") | known_flags("infer.py")
    for script, first, every in flag_tables(read(page)):
        missing = set(first) - known_flags(script)
        assert not missing, f"{page.name}: {script} has no {missing}"
        assert set(every) <= both, f"{page.name}: no script has {set(every) - both}"


def code_spans(text: str) -> list[str]:
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    return fenced + re.findall(r"`([^`\n]+)`", without_code_blocks(text))


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_make_targets_named_exist(page):
    makefile = read(ROOT / "Makefile")
    for code in code_spans(read(page)):
        for target in re.findall(r"(?:^|[\s;&(])make ([a-z][\w-]*)", code, re.M):
            assert re.search(rf"^{target}:", makefile, re.M), f"{page.name}: make {target}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.*)$", without_code_blocks(read(page)), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_point_at_files_and_headings_that_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(read(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} (no {linked})"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def test_the_readme_links_every_docs_page_and_troubleshooting():
    readme = read(ROOT / "README.md")
    for page in PAGES[1:]:
        assert f"](docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
    assert "](docs/troubleshooting.md" in readme


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_repository_files_named_exist(page):
    """`examples/lora_in_one_screen.py`, `bench/quantized.py`, `recipes/chinese_med.yaml`, ...
    (placeholders such as `bench/results/X.json` or `...-<L>-...` are not files)."""
    roots = "bench|docs|data|examples|recipes|tests|tools"
    pattern = rf"(?<![\w./-])(?:{roots})/[\w./<>*-]*\.(?:py|md|yaml|json|jsonl|png)\b"
    for path in re.findall(pattern, read(page)):
        if re.search(r"[<>*]|/X\.\w+$", path):
            continue
        assert (ROOT / path).exists(), f"{page.name}: {path}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_module_paths_named_exist(page):
    """`lora/train/loop.py`, `lora/data/`, `lora.train.loop.train`, `python -m lora.inspect`:
    each names a file or folder of the package as it is now."""
    text = read(page)
    for path in re.findall(r"(?<![\w./-])lora/[\w/]*\w(?:\.py)?", text):
        assert (ROOT / path).exists(), f"{page.name}: {path}"
    for dotted in re.findall(r"(?<![\w./-])lora(?:\.[A-Za-z_]\w*)+", text):
        where = ROOT / "lora"
        for part in dotted.split(".")[1:]:
            if (where / part).is_dir():
                where = where / part
            elif (where / f"{part}.py").is_file():
                break
            else:  # a class of a package (lora.LoRALinear) is fine, a lost module is not
                assert not part.islower() or part.startswith("_"), f"{page.name}: {dotted}"
                break
