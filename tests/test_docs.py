"""The documents cannot drift from the CLI: the README's two commands are Makefile targets, and
every `clp ...` command line shown in README.md, docs/*.md, results/README.md and
artifacts/README.md names an existing subcommand and only options that subcommand has.

Checked through click's own objects (``clp.cli.main``), without running anything.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from clp.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "results" / "README.md",
    ROOT / "artifacts" / "README.md",
]
DOCS = [d for d in DOCS if d.is_file()]

FENCE = re.compile(r"^(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks (backslash continuations joined), plus
    inline code spans."""
    lines, in_fence, pending = [], False, ""
    for raw in text.splitlines():
        if FENCE.match(raw.strip()):
            in_fence = not in_fence
            continue
        if not in_fence and raw.startswith("    "):  # indented: a code block or a list's text
            lines.extend(m.group(1).strip() for m in INLINE.finditer(raw))
        if in_fence or raw.startswith("    "):
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            lines.append(line)
        elif not in_fence:
            lines.extend(m.group(1).strip() for m in INLINE.finditer(raw))
    return lines


def clp_commands(path: Path) -> list[str]:
    """Every `clp ...` command line of a document, without a shell prompt."""
    found = []
    for line in _code_lines(path.read_text(encoding="utf-8")):
        line = line.removeprefix("$ ")
        if re.match(r"clp\s+[a-z]", line):
            found.append(line)
    return found


def check_command(line: str) -> list[str]:
    """Problems with one command line: unknown subcommands or options."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:
        return [f"cannot split: {exc}"]
    assert words[0] == "clp"
    cmd: click.Command = main
    path = ["clp"]
    rest = words[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            return [f"'{' '.join(path)}' has no subcommand '{rest[0]}'"]
        cmd, path, rest = sub, [*path, rest[0]], rest[1:]
    options: dict[str, click.Option] = {}
    for param in cmd.params:
        if isinstance(param, click.Option):
            for name in param.opts + param.secondary_opts:
                options[name] = param
    problems, i = [], 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if word == "--" or not word.startswith("-") or re.fullmatch(r"-\d.*", word):
            continue
        name = word.split("=", 1)[0]
        if name == "--help":
            continue
        option = options.get(name)
        if option is None:
            problems.append(f"'{' '.join(path)}' has no option {name}")
        elif not option.is_flag and not option.count and "=" not in word:
            i += 1  # its value
    return problems


CASES = [(doc, line) for doc in DOCS for line in clp_commands(doc)]


def test_the_documents_show_clp_commands():
    readme = [line for doc, line in CASES if doc.name == "README.md" and doc.parent == ROOT]
    assert len(readme) >= 5
    assert any(doc.parent.name == "docs" for doc, _ in CASES)


@pytest.mark.parametrize(
    "doc, line", CASES, ids=[f"{d.relative_to(ROOT)}: {line[:60]}" for d, line in CASES]
)
def test_clp_command_parses(doc, line):
    assert not check_command(line), f"{doc.relative_to(ROOT)}: {line}"


def test_readme_commands_are_makefile_targets():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, flags=re.M))
    shown = {m.group(1) for m in re.finditer(r"^make\s+([\w.-]+)", readme, flags=re.M)}
    assert {"demo", "test"} <= shown, "the README must show `make demo` and `make test`"
    assert shown <= targets, f"not Makefile targets: {shown - targets}"


def test_the_checker_catches_drift():
    assert check_command("clp generate --mode verify -n 4 hi") == []
    assert check_command("clp bench --out x --no-such-flag") == [
        "'clp bench' has no option --no-such-flag"
    ]
    assert check_command("clp no-such-command --x") == ["'clp' has no subcommand 'no-such-command'"]
    assert check_command("clp train predictor --heads d --k 2") == [
        "'clp train predictor' has no option --k"
    ]
