"""`nattool serve --print-unit`: the shipped systemd unit, its ExecStart running this
nattool with the flags given next to --print-unit."""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator, Sequence

from nattool.config import KEYS

# Where the unit keeps its state (StateDirectory=nattool, %S = /var/lib): the store
# used when no --store is given.
DEFAULT_UNIT_STORE = "sqlite:%S/nattool/tracker.db"

# The unit's ProtectHome=yes makes these invisible to the service.
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")

# Words systemd takes as they are; anything else is double-quoted.
_PLAIN_WORD = re.compile(r"[\w@%$+=:,./\[\]-]+")


def unit_text(flags: dict[str, Any], config_path: str | None) -> str:
    """The unit, with ExecStart = this program + serve + the flags that were given."""
    template = files("nattool").joinpath("data/nattool.service").read_text()
    words = [*(systemd_word(w) for w in running_program()), "serve", *serve_words(flags, config_path)]
    exec_start = "ExecStart=" + " ".join(words)
    return re.sub(r"^ExecStart=.*$", lambda _: exec_start, template, count=1, flags=re.M)


def running_program() -> list[str]:
    """The command that started this process, as absolute paths systemd can exec.

    Symlinks are kept: a virtualenv's python is a symlink, and resolving it would run
    the system Python without the environment's packages.
    """
    argv0 = sys.argv[0]
    if Path(argv0).name == "__main__.py":  # python -m nattool
        return [os.path.abspath(sys.executable), "-m", "nattool"]
    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    return [os.path.abspath(found or argv0)]


def serve_words(flags: dict[str, Any], config_path: str | None) -> list[str]:
    """The given ``serve.*`` flags as command-line words, quoted for systemd. Paths
    become absolute (a service runs in /)."""
    store = flags.get("serve.store")
    default_store = store is None or _sqlite_path(store) == ""
    words = ["--store", DEFAULT_UNIT_STORE if default_store else systemd_word(_absolute_store(store))]
    for key, value in flags.items():
        if key == "serve.store" or value is None:
            continue
        flag = KEYS[key].flag
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is False:  # an --x/--no-x flag turned off
                words += ["--no-" + flag[2:]]
            else:
                words += [flag] if item is True else [flag, systemd_word(_flag_value(item))]
    if config_path:
        words += ["--config", systemd_word(os.path.abspath(config_path))]
    return words


def hidden_paths(flags: dict[str, Any], config_path: str | None) -> list[str]:
    """The program, config file and SQLite file the unit names that ProtectHome=yes
    hides from the service (a pipx or venv install in a home directory)."""
    return [path for path in _unit_paths(flags, config_path) if is_hidden_by_protect_home(path)]


def is_hidden_by_protect_home(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in HIDDEN_BY_PROTECT_HOME)


def _unit_paths(flags: dict[str, Any], config_path: str | None) -> Iterator[str]:
    yield running_program()[0]
    if config_path:
        yield os.path.abspath(config_path)
    sqlite_path = _sqlite_path(flags.get("serve.store") or "")
    if sqlite_path:
        yield os.path.abspath(sqlite_path)


def systemd_word(text: str) -> str:
    """``text`` as one ExecStart word: specifiers (%) and variables ($) doubled so that
    systemd keeps them, quoted with C escapes where it holds anything else."""
    text = text.replace("%", "%%").replace("$", "$$")
    if _PLAIN_WORD.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _flag_value(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def _absolute_store(spec: str) -> str:
    path = _sqlite_path(spec)
    return "sqlite:" + os.path.abspath(path) if path else spec


def _sqlite_path(spec: str) -> str | None:
    """The file of a ``sqlite:PATH`` store spec ("" for the default), None for others."""
    text = spec.strip()
    if text != "sqlite" and not text.startswith("sqlite:"):
        return None
    path = text[len("sqlite:") :]
    return path[2:] if path.startswith("//") else path  # the URL-ish sqlite:///abs/path


__all__: Sequence[str] = (
    "DEFAULT_UNIT_STORE",
    "hidden_paths",
    "is_hidden_by_protect_home",
    "running_program",
    "serve_words",
    "systemd_word",
    "unit_text",
)
