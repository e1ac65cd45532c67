"""The docs cannot drift from the code: every flag they name exists, every default the reference tables state
is the parser's, every relative link resolves, and the README stays a short read.

Flags are read from what each script's parser knows: fit.py's from `mlp.cli.build_cli` (the parser every run
is built by), the other scripts' from the argparse parser their `main` builds, caught when it parses.
"""

import argparse
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w.+-]*")
SCRIPT = re.compile(r"(?:scripts/)?(\w+)\.py\b")
# The scripts whose flags a bare `--flag` in the docs may be: the ones a user types day to day.
MAIN_SCRIPTS = ("fit", "tune", "predict")
# Scripts that hand the flags they do not know on: to fit.py's parser, or (trials_per_hour.py, after `--`) to tune.py.
PASSES_ON = {"tune": ("fit",), "exercises": ("fit",), "trials_per_hour": ("tune", "fit")}


class Parsed(Exception):
    """Raised in place of parsing, carrying the parser a script's main built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def script_parser(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser scripts/<name>.py's main builds. The scripts build it inside main, under names of
    their own, so it is caught where every one of them ends up: parsing."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def catch(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Parsed(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        patch.setattr(sys, "argv", [f"{name}.py"])  # for a main that reads sys.argv itself
        try:
            module.main([]) if inspect.signature(module.main).parameters else module.main()
        except Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"scripts/{name}.py's main parsed no command line")


def argparse_defaults(parser: argparse.ArgumentParser, flags: set[str]) -> dict[str, object]:
    """The default of each flag, under argparse's own naming of its destination (`--n-trials`: n_trials)."""
    return {flag: parser.get_default(flag[2:].replace("-", "_")) for flag in flags}


@pytest.fixture(scope="module")
def parsers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[str], dict[str, object]]]:
    """By script name: the flags its --help lists, and the default of each (dotted keys for fit.py)."""
    from mlp.cli import build_cli
    from mlp.search import SearchSpace

    found = {}
    save_dir = tmp_path_factory.mktemp("logs")
    fit = build_cli([f"--trainer.logger.init_args.save_dir={save_dir}"]).parser
    found["fit"] = (set(FLAG.findall(fit.format_help())), fit.get_defaults())
    with pytest.MonkeyPatch.context() as monkeypatch:
        for script in sorted((ROOT / "scripts").glob("*.py")):
            if script.stem == "fit":
                continue
            if "def main(" not in script.read_text():
                continue  # a script without a main of its own has no flags to name
            parser = script_parser(script.stem, monkeypatch)
            flags = set(FLAG.findall(parser.format_help()))
            found[script.stem] = (flags, argparse_defaults(parser, flags))
    # tune.py's search ranges default to None on the command line, meaning SearchSpace's range.
    tune_defaults = found["tune"][1]
    for name, bounds in vars(SearchSpace()).items():
        tune_defaults[f"--{name.replace('_', '-')}"] = bounds
    return found


def flag_known(flag: str, flags: set[str]) -> bool:
    """Whether `flag` (possibly `--x=value`) is one of `flags`, or a sub-key of one that takes a class, as
    `--trainer.logger.init_args.save_dir` is of `--trainer.logger`."""
    flag = flag.split("=")[0].rstrip(".")
    if flag in flags:
        return True
    head, _, tail = flag.partition(".init_args.")
    return bool(tail) and head in flags


def code_spans(text: str) -> tuple[list[str], list[str]]:
    """The commands of the fenced code blocks (one per line, continuations joined) and the inline code spans.

    A block fenced as `fork-example` shows code as it is after a change the reader makes (docs/forking.md), so
    its flags need not exist yet.
    """
    fences = re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)
    blocks = [body for info, body in fences if "fork-example" not in info]
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return commands, re.findall(r"`([^`\n]+)`", prose)


def runs(script: str) -> tuple[str, ...]:
    """The parsers a flag on `script`'s command line may belong to."""
    return (script, *PASSES_ON.get(script, ()))


def named_flags(page: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Each flag the page names, with the scripts it may belong to.

    In a command, a flag belongs to the script the command runs (`python scripts/bench.py --tuning`, or inline
    `bench.py --tuning`); flags of other programs (`tensorboard --logdir`) are not ours to check. An inline span
    that starts with a flag (or with `...`, a command line continued) names flags of fit.py, tune.py or predict.py.
    """
    commands, spans = code_spans(page.read_text())
    named = []
    for command in commands:
        for part in re.split(r"&&|\|\||;|\||(?<![>&])&(?!>)", command.split(" #")[0]):
            script = SCRIPT.search(part)
            if script and ("python" in part[: script.start()] or part.lstrip().startswith(script.group(0))):
                named += [(flag, runs(script.group(1))) for flag in FLAG.findall(part[script.end():])]
    for span in spans:
        script = SCRIPT.search(span) if span.startswith("python ") else SCRIPT.match(span)
        if script:
            named += [(flag, runs(script.group(1))) for flag in FLAG.findall(span[script.end():])]
        elif span.startswith(("--", "...")):
            named += [(flag, MAIN_SCRIPTS) for flag in FLAG.findall(span)]
    return named


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_flag_the_docs_name_exists(page, parsers):
    unknown = [
        f"{flag} (a flag of {' or '.join(f'{s}.py' for s in scripts)})"
        for flag, scripts in named_flags(page)
        if not any(script in parsers and flag_known(flag, parsers[script][0]) for script in scripts)
    ]
    assert not unknown, f"{page.relative_to(ROOT)} names flags no parser knows: {unknown}"


def stated(text: str) -> str:
    return text.strip().strip("`").strip()


def same_default(written: str, actual: object) -> bool:
    """Whether the default a table states (`written`) is the parser's (`actual`)."""
    if actual is None or actual is False:
        return written.lower() in ("none", "off", "false") if actual is False else written.lower() == "none"
    if actual is True:
        return written.lower() in ("true", "on")
    if isinstance(actual, (tuple, list)):
        parts = written.split()
        return len(parts) == len(actual) and all(same_default(p, a) for p, a in zip(parts, actual))
    if isinstance(actual, (int, float)):
        try:
            return float(written.replace(",", "")) == float(actual)
        except ValueError:
            return False
    return written == str(actual)


def reference_rows(page: Path) -> list[tuple[str, str]]:
    """(flag, default) of each row of the page's tables headed `| flag | default | ...`; a row may name several
    flags with their defaults in the same order (`--model.depth`, `--model.width` | 2, 512)."""
    rows, in_table = [], False
    for line in page.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["flag", "default"]:
            in_table = True
        elif not cells:
            in_table = False
        elif in_table and not set(cells[0]) <= set("-: "):
            flags = FLAG.findall(cells[0])
            defaults = [stated(d) for d in cells[1].split(", ")] if len(flags) > 1 else [stated(cells[1])]
            assert flags and len(flags) == len(defaults), f"{page.name}: a flag row without one default a flag: {line}"
            rows += zip(flags, defaults)
    return rows


def parser_default(flag: str, parsers: dict) -> tuple[bool, object]:
    if flag.startswith("--") and "." in flag or flag in ("--seed_everything", "--ckpt_path"):
        defaults = parsers["fit"][1]
        value = defaults
        for key in flag[2:].split("."):
            if key not in value:
                return False, None
            value = value[key]
        return True, value
    for script in MAIN_SCRIPTS:
        if script in parsers and flag in parsers[script][1]:
            return True, parsers[script][1][flag]
    return False, None


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "reference.md"], ids=lambda page: page.name)
def test_the_flag_tables_state_the_parsers_defaults(page, parsers):
    rows = reference_rows(page)
    least = 20 if page.name == "reference.md" else 5
    assert len(rows) > least, f"{page.name} lists its flags in tables headed | flag | default |"
    wrong = []
    for flag, written in rows:
        known, actual = parser_default(flag, parsers)
        if not known:
            wrong.append(f"{flag}: no such flag")
        elif not same_default(written, actual):
            wrong.append(f"{flag}: the table says {written!r}, the parser {actual!r}")
    assert not wrong, f"{page.name}: " + "; ".join(wrong)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces as hyphens, repeats
    numbered), plus explicit <a id="..."> anchors."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors, seen = set(re.findall(r'<a id="([^"]+)"', text)), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", re.sub(r"\]\([^)]*\)", "]", heading).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text()):
            broken.append(f"{target} (no such heading or anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_is_short_links_every_docs_page_and_names_no_commits():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= README_LIMIT, f"README.md is {len(text)} characters; keep it to {README_LIMIT}"
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
    hashes = [word for word in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", word)
              and re.search(r"\d", word)]
    assert not hashes, f"README.md cites commits {hashes}; they belong in docs/results.md"


def test_the_readme_layout_names_every_module_of_the_package():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("## ", 1)[0]
    listed = set(re.findall(r"^mlp/(\w+)\.py ", layout, flags=re.MULTILINE))
    modules = {p.stem for p in (ROOT / "mlp").glob("*.py") if p.stem != "__init__"}
    assert listed == modules, f"README.md's layout misses {sorted(modules - listed)}; names {sorted(listed - modules)}"


def test_the_quick_start_runs_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test_command.strip() in (ROOT / "README.md").read_text()
