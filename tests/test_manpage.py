"""man/nattool.1: fresh, lint-clean, renders, and matches the CLI in both directions.

The page is generated (python -m nattool.cli.docgen all); these tests read the
*committed* file back as roff and compare it with the live Typer app, so a command or
option added, renamed or removed without regenerating fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Annotated, Optional

import pytest
import typer

from conftest import REPO
from nattool.cli import docgen
from nattool.config import ENV_CONFIG, KEYS
from nattool.exit_codes import ExitCode

PAGE = REPO / docgen.MAN_PATH
# An option as roff writes it: \-t, \-\-rate\-limit (a plain "-" inside is tolerated too).
OPTION_RE = re.compile(r"(?<![\w\\-])\\-(?:\\-)?[A-Za-z0-9](?:[A-Za-z0-9]|\\?-)*")


def page_text() -> str:
    assert PAGE.is_file(), f"{PAGE} is missing; run: {docgen.REGENERATE}"
    return PAGE.read_text(encoding="utf-8")


def unescape_option(token: str) -> str:
    return token.replace("\\-", "-")


def sections(text: str) -> dict[str, list[str]]:
    """The page split at .SH and .SS: {"SYNOPSIS": [...], "nattool serve": [...]}."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        m = re.match(r'\.S[HS] "?(.*?)"?$', line)
        if m:
            current = m.group(1).replace("\\-", "-")
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def tp_heads(lines: list[str]) -> list[str]:
    """The tag lines of .TP paragraphs."""
    return [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == ".TP"]


def plain(roff_text: str) -> str:
    """Without font changes (\\fB ... \\fR), so that option names stand alone."""
    return re.sub(r"\\f[BIRP]", "", roff_text)


def options_in(lines: list[str]) -> set[str]:
    return {unescape_option(t) for head in tp_heads(lines) for t in OPTION_RE.findall(plain(head))}


# -- fresh ----------------------------------------------------------------------------------


def test_committed_page_is_fresh() -> None:
    fresh = docgen.render_man(date=docgen._changelog_date(REPO))
    assert page_text() == fresh, f"man/nattool.1 is stale; run: {docgen.REGENERATE}"


def test_the_repository_documents_the_page_names_exist() -> None:
    text = page_text()
    assert docgen.REPOSITORY_DOCS
    for path in docgen.REPOSITORY_DOCS:
        assert path in text
        assert (REPO / path).is_file(), f"the man page refers readers to {path}, which is not in the repository"
    assert re.search(r"(?<![/\w])PROTOCOL\.md", text) is None  # only ever docs/PROTOCOL.md


# -- lint and render ---------------------------------------------------------------------------


def test_groff_lint_is_silent() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (.ci/run installs groff-base)")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(PAGE)], capture_output=True, text=True, timeout=60)
    # groff exits 0 even when it warns: the warnings are the verdict.
    assert result.returncode == 0 and result.stderr == "", result.stderr


def render(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT", "MANROFFOPT")}
    env.update(MANWIDTH="80", MANPAGER="cat", PAGER="cat", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    env.pop("MAN_KEEP_FORMATTING", None)
    return subprocess.run(["man", *args], capture_output=True, text=True, env=env, timeout=60)


def test_man_renders_without_warnings() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (.ci/run installs man-db)")
    result = render("--warnings", "-l", str(PAGE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    out = result.stdout
    assert out.startswith("NATTOOL(1)")
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"):
        assert re.search(rf"^{heading}$", out, re.M), heading
    width = max(len(line) for line in out.splitlines())
    assert width <= 80 or all(
        len(line) <= 80 or line.lstrip().startswith("nattool ") for line in out.splitlines()
    ), "text wider than MANWIDTH outside the literal examples"
    # Every option of every command survives rendering as a plain ASCII option name.
    tree = docgen.cli_tree()
    for cmd in tree.walk():
        for opt in cmd.option_names():
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out), f"{opt} of {cmd.name} not in the rendered page"


# -- the page against the CLI ---------------------------------------------------------------------


def test_every_command_and_option_of_the_cli_is_in_the_page() -> None:
    tree = docgen.cli_tree()
    secs = sections(page_text())
    synopsis = "\n".join(secs["SYNOPSIS"]).replace("\\fB", "").replace("\\fR", "")
    for cmd in tree.leaves():
        assert cmd.name in secs, f"no section for {cmd.name}; run: {docgen.REGENERATE}"
        assert cmd.name in synopsis, f"{cmd.name} not in SYNOPSIS"
        documented = options_in(secs[cmd.name])
        missing = cmd.option_names() - documented
        assert not missing, f"{cmd.name}: options not in its section: {sorted(missing)}"
        for arg in cmd.arguments:
            assert any(arg.name in head for head in tp_heads(secs[cmd.name])), (cmd.name, arg.name)
    assert tree.option_names() <= options_in(secs["GLOBAL OPTIONS"])


def test_every_option_in_the_page_exists_in_the_cli() -> None:
    tree = docgen.cli_tree()
    secs = sections(page_text())
    everything = set().union(*(c.option_names() for c in tree.walk()))
    for title, lines in secs.items():
        if title.startswith("nattool "):
            cmd = tree.find(title.split()[1:])
            assert cmd is not None and not cmd.subcommands, f"the page documents {title!r}, which the CLI does not have"
            extra = options_in(lines) - cmd.option_names()
            assert not extra, f"{title}: the page documents options the command does not have: {sorted(extra)}"
    assert options_in(secs["GLOBAL OPTIONS"]) <= tree.option_names()
    # Prose anywhere (configuration, files, examples) may only name real options.
    for token in {unescape_option(t) for t in OPTION_RE.findall(plain(page_text()))}:
        if token.startswith("--") or re.fullmatch(r"-[A-Za-z0-9]", token):
            assert token in everything, f"the page mentions {token}, which no command has"


def test_examples_run_real_commands_and_options() -> None:
    tree = docgen.cli_tree()
    lines = sections(page_text())["EXAMPLES"]
    examples = [
        lines[i + 1].replace("\\-", "-").replace("\\&", "")
        for i, ln in enumerate(lines[:-1])
        if ln == ".nf"
    ]
    assert len(examples) >= 5
    for line in examples:
        assert docgen.example_problems(tree, line) == [], line


def test_example_checker_catches_drift() -> None:
    """The checker the generator applies to EXAMPLES is not a rubber stamp."""
    tree = docgen.cli_tree()
    assert docgen.example_problems(tree, "nattool whoami --no-such-option")
    assert docgen.example_problems(tree, "nattool no-such-command")
    assert docgen.example_problems(tree, "nattool config")  # a group alone runs nothing
    assert docgen.example_problems(tree, "NATTOOL_TRACKERS=x nattool register g --keepalive 5") == []
    assert docgen.example_problems(tree, "nattool -q config path") == []


def test_exit_status_environment_and_files_match_the_code() -> None:
    secs = sections(page_text())
    codes = [ln.replace("\\fB", "").replace("\\fR", "") for ln in tp_heads(secs["EXIT STATUS"])]
    assert codes == [str(int(c)) for c in ExitCode]
    env_names = [ln.replace("\\fB", "").replace("\\fR", "") for ln in tp_heads(secs["ENVIRONMENT"])]
    wanted = {k.env for k in KEYS.values() if k.env} | {ENV_CONFIG, "NO_COLOR"}
    assert wanted <= set(env_names), sorted(wanted - set(env_names))
    files = "\n".join(secs["FILES"])
    assert "config.toml" in files and "tracker.db" in files
    for key in KEYS:  # every config key is named where the file is described
        assert key.rsplit(".", 1)[-1] in files, key


def test_readme_exit_code_table_matches_the_code() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", table, re.M)]
    assert documented == [int(c) for c in ExitCode]


# -- the generator follows the CLI ------------------------------------------------------------------


def test_a_new_command_appears_when_regenerated() -> None:
    """What happens when connect (or anything) is registered: the page grows a section
    with every option, without touching the generator."""
    from nattool.cli.app import app as live

    app = typer.Typer(name="nattool", context_settings={"help_option_names": ["-h", "--help"]})
    app.registered_callback = live.registered_callback
    app.registered_commands = list(live.registered_commands)
    app.registered_groups = list(live.registered_groups)

    @app.command()
    def frobnicate(
        peer: Annotated[str, typer.Argument(metavar="PEER", help="Whom to frobnicate.")],
        rounds: Annotated[int, typer.Option("--rounds", "-r", metavar="N", help="How often.")] = 3,
        dry: Annotated[Optional[bool], typer.Option("--dry-run/--for-real", help="Pretend.")] = None,
    ) -> None:
        """Frobnicate a peer."""

    text = docgen.render_man(docgen.cli_tree(app))
    secs = sections(text)
    assert "nattool frobnicate" in secs
    assert options_in(secs["nattool frobnicate"]) == {"-r", "--rounds", "--dry-run", "--for-real", "-h", "--help"}
    assert "Frobnicate a peer." in "\n".join(secs["nattool frobnicate"])
    assert "nattool frobnicate" in "\n".join(secs["SYNOPSIS"]).replace("\\fB", "").replace("\\fR", "")
    assert "nattool serve" in secs  # the live commands are still there


def test_page_is_installed_as_a_data_file() -> None:
    """pyproject ships the page where `man` looks next to a venv's bin/ (share/man/man1)."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    data_files = pyproject["tool"]["setuptools"]["data-files"]
    assert "man/nattool.1" in data_files["share/man/man1"]
