"""What the CLI says: error lines, help text, tables. Each runs the real `nattool`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import TrackerFactory, nattool_env, run_nattool
from nattool.diag.bench import MAX_DURATION, BenchConfig, validate
from nattool.exit_codes import ExitCode
from nattool.protocol.endpoint import Endpoint

COMMANDS = ("serve", "whoami", "register", "trackers", "probe", "connect", "bench", "config", "config show", "config path")


def _one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == ExitCode.USAGE, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nattool: error: "), res.stderr
    return lines[0]


# -- ranges say what they accept ----------------------------------------------------------------


def test_bench_duration_zero_names_a_range_that_excludes_it(nattool_home: Path) -> None:
    line = _one_error_line(run_nattool("bench", "127.0.0.1:9", "--duration", "0", home=nattool_home))
    assert "bad --duration 0: want more than 0 and at most 3600 seconds" in line, line
    assert "0..3600" not in line
    # The message's bounds are the check's: the largest duration is accepted.
    validate(BenchConfig(target=Endpoint.from_text("127.0.0.1:9"), duration=MAX_DURATION))


def test_bench_max_loss_one_is_refused_with_a_range_that_excludes_it(nattool_home: Path) -> None:
    line = _one_error_line(run_nattool("bench", "127.0.0.1:9", "--max-loss", "1", home=nattool_home))
    assert "bad --max-loss 1: want a ratio from 0 up to, not including, 1" in line, line


# -- unknown options ---------------------------------------------------------------------------


def test_an_unknown_option_is_one_line_without_a_far_fetched_suggestion(nattool_home: Path) -> None:
    line = _one_error_line(run_nattool("--bogus", home=nattool_home))
    assert line == "nattool: error: no such option: --bogus (see 'nattool --help')"


@pytest.mark.parametrize(
    "argv,typo,near",
    [(["--verbos"], "--verbos", "--verbose"), (["whoami", "--trackr", "x"], "--trackr", "--tracker")],
)
def test_a_near_miss_option_gets_the_right_suggestion(argv: list[str], typo: str, near: str, nattool_home: Path) -> None:
    line = _one_error_line(run_nattool(*argv, home=nattool_home))
    assert f"no such option: {typo} (did you mean {near}?)" in line, line


def test_an_unknown_option_of_a_subcommand_names_its_help(nattool_home: Path) -> None:
    line = _one_error_line(run_nattool("whoami", "--bogus", home=nattool_home))
    assert line == "nattool: error: no such option: --bogus (see 'nattool whoami --help')"


# -- help text ---------------------------------------------------------------------------------


def _help(command: str, home: Path) -> str:
    res = run_nattool(*command.split(), "--help", home=home, env=nattool_env(home, COLUMNS="80"))
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_arguments_without_type_names_or_braces(command: str, nattool_home: Path) -> None:
    text = _help(command, nattool_home)
    assert not re.search(r"<(list\[)?(str|int|float|bool)", text), text
    assert "{" not in text.split("\n\n", 1)[0], text  # the usage line


def test_usage_lines_and_argument_lists(nattool_home: Path) -> None:
    assert _help("register", nattool_home).startswith("Usage: nattool register [OPTIONS] GROUP\n")
    whoami = _help("whoami", nattool_home)
    assert whoami.startswith("Usage: nattool whoami [OPTIONS] [TRACKER...]\n")
    assert re.search(r"^  TRACKER\.\.\.  Trackers to ask", whoami, re.M), whoami


def test_every_command_has_a_whole_one_line_summary(nattool_home: Path) -> None:
    text = _help("", nattool_home)
    section = text.split("Commands:\n", 1)[1]
    rows = [line for line in section.splitlines() if line.strip()]
    names = [row.split()[0] for row in rows]
    assert names == ["serve", "whoami", "register", "trackers", "probe", "connect", "bench", "config"], text
    for row in rows:
        assert row.startswith("  ") and not row.startswith("   ")  # no continuation lines
        assert not row.endswith("...") and row.endswith("."), row
        assert len(row) <= 80, row


# -- tables --------------------------------------------------------------------------------------


def test_tables_have_no_trailing_blanks(tracker: TrackerFactory, nattool_home: Path) -> None:
    tp = tracker()
    group = "polish-table-group"
    # Another member, so that the member table (whose last column is left-aligned) has a row.
    first = run_nattool("register", group, "-t", tp.endpoint, "--id", "02:00:00:00:00:01", home=nattool_home)
    assert first.returncode == 0, first.stderr
    outputs = [
        run_nattool("register", group, "-t", tp.endpoint, "--id", "02:00:00:00:00:02", home=nattool_home),
        run_nattool("trackers", "-t", tp.endpoint, home=nattool_home),
        run_nattool("whoami", tp.endpoint, home=nattool_home),
    ]
    for res in outputs:
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) >= 2, res.stdout
        for line in res.stdout.splitlines():
            assert line == line.rstrip(), repr(line)
    members = outputs[0].stdout.splitlines()
    assert any(line.startswith("member") for line in members), outputs[0].stdout
