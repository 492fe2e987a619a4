"""Settings: flags > environment > config file > defaults, each with its source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nattool.cli.options import ConfigOpt

from nattool.config import KEYS, default_config_path, load_settings
from nattool.errors import ConfigError, UsageError

FULL_FILE = """
trackers = ["file-tracker.example:1000", "[2001:db8::1]"]
timeout = 4
retries = 5
dns_server = "127.0.0.1:5353"

[serve]
host = ["127.0.0.1", "::1"]
port = 5000
ttl = 60
rate_limit = 0
store = "sqlite:/tmp/x.db"
log_level = "DEBUG"
public = "192.0.2.1:5000"
join = ["192.0.2.2:43283"]
metrics = 9100
alt_host = "127.0.0.2"
alt_port = 5001
workers = 2
coalesce_us = 100
no_stun = true
burst = 10
max_group_members = 16
tracker_ttl = 30
announce_interval = 5
max_members = 100
max_groups_per_source = 4
tcp = true
relay = true
turn_user = ["alice:wonderland"]
turn_secret = "rest-secret"
realm = "example.org"
relay_ip = ["192.0.2.9"]
relay_ports = "50000-50010"
allow_peer = ["10.0.0.0/8"]
deny_peer = ["198.51.100.0/24"]
max_allocations = 5
user_quota = 2
source_quota = 3
relay_bandwidth = 0
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A HOME with no config in it, so the developer's own config never leaks in.
    return {"HOME": str(tmp_path / "home"), **extra}


def test_defaults_when_nothing_is_given(tmp_path: Path) -> None:
    s = load_settings({}, config_path=None, environ=env(tmp_path))
    assert s.get("timeout") == 2.0 and s.source("timeout") == "default"
    assert s.get("retries") == 3
    assert s.get("trackers") == () and s.get("domain") is None
    assert s.get("serve.port") == 43283 and s.get("serve.ttl") == 120.0
    assert s.resolver_address() is None
    assert s.config_loaded is False
    assert s.config_path == tmp_path / "home" / ".config" / "nattool" / "config.toml"
    assert [item.key for item in s.items()] == list(KEYS)
    assert all(item.source == "default" for item in s.items())


def test_file_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    s = load_settings({}, config_path=str(path), environ=env(tmp_path))
    assert s.config_loaded and s.config_path_source == "flag --config"
    assert s.get("trackers") == ("file-tracker.example:1000", "[2001:db8::1]:43283")
    assert s.get("timeout") == 4.0 and isinstance(s.get("timeout"), float)
    assert s.resolver_address() == ("127.0.0.1", 5353)
    serve = s.serve()
    assert serve["host"] == ("127.0.0.1", "::1")
    assert serve["port"] == 5000 and serve["rate_limit"] == 0.0 and serve["log_level"] == "debug"
    assert serve["metrics"] == "9100" and serve["workers"] == 2 and serve["join"] == ("192.0.2.2:43283",)
    assert serve["coalesce_us"] == 100
    assert serve["no_stun"] is True and serve["burst"] == 10.0 and serve["max_group_members"] == 16
    for item in s.items():
        if item.key != "domain":
            assert item.source == f"file {path}", item


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    environ = env(
        tmp_path,
        NATTOOL_CONFIG=str(path),
        NATTOOL_TIMEOUT="3.5",
        NATTOOL_TRACKERS="env-a.example, 192.0.2.9:9",
        NATTOOL_STORE="memory",
    )
    s = load_settings(
        {"timeout": 1.5, "retries": None, "trackers": [], "serve.port": 6000},
        config_path=None,
        environ=environ,
    )
    assert (s.get("timeout"), s.source("timeout")) == (1.5, "flag")  # flag beats env and file
    assert (s.get("retries"), s.source("retries")) == (5, f"file {path}")  # None: flag not given
    assert s.get("trackers") == ("env-a.example:43283", "192.0.2.9:9")  # []: flag not given
    assert s.source("trackers") == "env NATTOOL_TRACKERS"
    assert (s.get("serve.store"), s.source("serve.store")) == ("memory", "env NATTOOL_STORE")
    assert (s.get("serve.port"), s.source("serve.port")) == (6000, "flag")
    assert (s.get("serve.ttl"), s.source("serve.ttl")) == (60.0, f"file {path}")
    assert (s.get("domain"), s.source("domain")) == (None, "default")
    assert s.config_path_source == "env NATTOOL_CONFIG"


def test_flag_config_beats_env_config(tmp_path: Path) -> None:
    a = write(tmp_path, "timeout = 7\n", "a.toml")
    b = write(tmp_path, "timeout = 8\n", "b.toml")
    s = load_settings({}, config_path=str(a), environ=env(tmp_path, NATTOOL_CONFIG=str(b)))
    assert s.get("timeout") == 7.0 and s.source("timeout") == f"file {a}"


def test_default_path_file_is_read(tmp_path: Path) -> None:
    environ = env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    path = tmp_path / "xdg" / "nattool" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('domain = "Example.ORG"\n')
    s = load_settings({}, config_path=None, environ=environ)
    assert s.get("domain") == "example.org" and s.source("domain") == f"file {path}"
    assert s.config_path_source == "default"


def test_trackers_and_domain_are_decided_together(tmp_path: Path) -> None:
    path = write(tmp_path, 'trackers = ["file.example"]\n')
    environ = env(tmp_path)
    # --domain on the command line: the file's trackers are not mixed in.
    s = load_settings({"domain": "example.org"}, config_path=str(path), environ=environ)
    assert s.get("domain") == "example.org" and s.source("domain") == "flag"
    assert s.get("trackers") == ()
    assert s.source("trackers") == "unset (domain from flag takes precedence)"
    # NATTOOL_TRACKERS beats a domain from the file.
    path2 = write(tmp_path, 'domain = "example.org"\n', "d.toml")
    s = load_settings({}, config_path=str(path2), environ=env(tmp_path, NATTOOL_TRACKERS="192.0.2.1"))
    assert s.get("trackers") == ("192.0.2.1:43283",) and s.get("domain") is None
    assert s.source("domain") == "unset (trackers from env NATTOOL_TRACKERS takes precedence)"
    # Both in the same layer: both kept.
    path3 = write(tmp_path, 'domain = "example.org"\ntrackers = ["192.0.2.1"]\n', "both.toml")
    s = load_settings({}, config_path=str(path3), environ=env(tmp_path))
    assert s.get("domain") == "example.org" and s.get("trackers") == ("192.0.2.1:43283",)


def test_platform_paths() -> None:
    home = {"HOME": "/home/u"}
    assert default_config_path(home, "linux") == Path("/home/u/.config/nattool/config.toml")
    assert default_config_path({**home, "XDG_CONFIG_HOME": "/x"}, "linux") == Path("/x/nattool/config.toml")
    # A relative XDG_CONFIG_HOME is invalid per the spec and ignored.
    assert default_config_path({**home, "XDG_CONFIG_HOME": "rel"}, "linux") == Path("/home/u/.config/nattool/config.toml")
    assert default_config_path(home, "darwin") == Path("/home/u/Library/Application Support/nattool/config.toml")
    assert default_config_path({**home, "APPDATA": "/appdata"}, "win32") == Path("/appdata/nattool/config.toml")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("timeout = ", ["invalid TOML"]),
        ("timeout = 2\ntimeout = 3\n", ["invalid TOML"]),
        ("timout = 2\n", ["unknown key 'timout'", "did you mean 'timeout'"]),
        ("[serve]\nprot = 1\n", ["unknown key 'serve.prot'", "did you mean 'serve.port'"]),
        ("[client]\nx = 1\n", ["unknown key 'client'"]),
        ('timeout = "2"\n', ["key 'timeout' must be a number > 0", "got '2'"]),
        ("timeout = 0\n", ["key 'timeout' must be a number > 0"]),
        ("timeout = nan\n", ["key 'timeout' must be a number > 0"]),
        ("timeout = true\n", ["key 'timeout' must be a number > 0", "a boolean"]),
        ("retries = 1.5\n", ["key 'retries' must be an integer 0..100", "a float"]),
        ('trackers = "a.example"\n', ["key 'trackers' must be a list of strings"]),
        ('trackers = ["a.example:99999"]\n', ["key 'trackers': bad tracker 'a.example:99999': port 99999 out of range"]),
        ('dns_server = "dns.example"\n', ["key 'dns_server' must be an IP address"]),
        ('domain = "192.0.2.1"\n', ["key 'domain' must be a DNS domain name"]),
        ("serve = 1\n", ["key 'serve' must be a table"]),
        ("[serve]\nport = 70000\n", ["key 'serve.port' must be an integer 0..65535"]),
        ('[serve]\nlog_level = "loud"\n', ["key 'serve.log_level' must be one of debug, info"]),
        ("[serve]\nworkers = 0\n", ["key 'serve.workers' must be an integer 1..1024"]),
        ("[serve]\nno_stun = 1\n", ["key 'serve.no_stun' must be true or false"]),
        ("[serve]\nhost = [1, 2]\n", ["key 'serve.host' must be a string or a list of strings"]),
    ],
)
def test_bad_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_path=str(path), environ=env(tmp_path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_not_utf8_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'domain = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8|invalid TOML"):
        load_settings({}, config_path=str(path), environ=env(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings({}, config_path=str(tmp_path), environ=env(tmp_path))


def test_missing_explicit_file_is_an_error_missing_default_is_not(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml \(from flag --config\) does not exist"):
        load_settings({}, config_path=str(missing), environ=env(tmp_path))
    with pytest.raises(ConfigError, match=r"nope.toml \(from env NATTOOL_CONFIG\) does not exist"):
        load_settings({}, config_path=None, environ=env(tmp_path, NATTOOL_CONFIG=str(missing)))
    s = load_settings({}, config_path=None, environ=env(tmp_path))
    assert not s.config_loaded


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("NATTOOL_TIMEOUT", "soon", "environment NATTOOL_TIMEOUT: expected a number, got 'soon'"),
        ("NATTOOL_TIMEOUT", "-1", "environment NATTOOL_TIMEOUT: expected a number > 0"),
        ("NATTOOL_RETRIES", "2.5", "environment NATTOOL_RETRIES: expected an integer"),
        ("NATTOOL_TRACKERS", "a.example,host:0", "environment NATTOOL_TRACKERS: bad tracker 'host:0'"),
        ("NATTOOL_DNS_SERVER", "resolver.example", "environment NATTOOL_DNS_SERVER: expected an IP address"),
        ("NATTOOL_DOMAIN", "exa mple.org", "environment NATTOOL_DOMAIN: expected a DNS domain name"),
    ],
)
def test_bad_env(tmp_path: Path, name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_path=None, environ=env(tmp_path, **{name: value}))
    assert fragment in str(info.value)


def test_empty_env_counts_as_unset(tmp_path: Path) -> None:
    s = load_settings({}, config_path=None, environ=env(tmp_path, NATTOOL_TIMEOUT=" ", NATTOOL_CONFIG=""))
    assert s.source("timeout") == "default" and s.config_path_source == "default"


def test_bad_flag_values_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--timeout: expected a number > 0, got a float -1.0"):
        load_settings({"timeout": -1.0}, config_path=None, environ=env(tmp_path))
    with pytest.raises(UsageError, match="^--tracker: bad tracker 'bad host'"):
        load_settings({"trackers": ["bad host"]}, config_path=None, environ=env(tmp_path))
    with pytest.raises(UsageError, match="^--host: an empty value$"):
        load_settings({"serve.host": [""]}, config_path=None, environ=env(tmp_path))
    with pytest.raises(UsageError, match="--rate-limit"):
        load_settings({"serve.rate_limit": -5}, config_path=None, environ=env(tmp_path))
    with pytest.raises(KeyError):  # a command passing a key that does not exist is a bug
        load_settings({"colour": 1}, config_path=None, environ=env(tmp_path))


# ------------------------------------------------------------------ `nattool config`


def run_config(args: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    from nattool.cli.config_cmd import app

    runner = CliRunner()
    # CliRunner's env adds to os.environ; clear the variables that matter first.
    cleared = {k: None for k in os.environ if k.startswith("NATTOOL_") or k in ("XDG_CONFIG_HOME", "APPDATA")}
    result = runner.invoke(app, args, env={**cleared, **environ})
    return result.exit_code, result.stdout, result.stderr


def test_config_show_json_and_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'timeout = 4\n[serve]\nport = 5000\n')
    environ = env(tmp_path, NATTOOL_TRACKERS="192.0.2.1:5")
    code, out, _ = run_config(["show", "--json", "--config", str(path)], environ)
    assert code == 0, out
    data = json.loads(out)
    assert data["config_file"] == {"path": str(path), "source": "flag --config", "loaded": True}
    assert data["settings"]["timeout"] == {"value": 4.0, "source": f"file {path}"}
    assert data["settings"]["trackers"] == {"value": ["192.0.2.1:5"], "source": "env NATTOOL_TRACKERS"}
    assert data["settings"]["retries"] == {"value": 3, "source": "default"}
    assert data["settings"]["serve.port"]["value"] == 5000

    code, out, _ = run_config(["show", "--config", str(path)], environ)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["timeout"].split()[1:] == ["4.0", "file", str(path)]
    assert lines["trackers"].split()[1:] == ["192.0.2.1:5", "env", "NATTOOL_TRACKERS"]
    assert "\x1b[" not in out  # not a terminal: no colour codes


def test_config_show_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "timout = 1\n")
    code, out, err = run_config(["show", "--config", str(path)], env(tmp_path))
    assert code == 2
    assert out == ""
    assert err.strip().startswith("nattool: error: config file") and "unknown key 'timout'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_config_path(tmp_path: Path) -> None:
    code, out, _ = run_config(["path"], env(tmp_path))
    assert code == 0
    assert out.strip() == str(tmp_path / "home" / ".config" / "nattool" / "config.toml")
    target = write(tmp_path, "")
    code, out, _ = run_config(["path"], env(tmp_path, NATTOOL_CONFIG=str(target)))
    assert out.strip() == str(target)


def test_config_given_to_the_main_command_is_honoured(tmp_path: Path) -> None:
    from nattool.cli.config_cmd import app as config_app

    root = typer.Typer()

    @root.callback()
    def main(config: ConfigOpt = None) -> None:
        """A stand-in for the nattool main callback with a global --config."""

    root.add_typer(config_app, name="config")
    path = write(tmp_path, "retries = 9\n")
    result = CliRunner().invoke(root, ["--config", str(path), "config", "show", "--json"], env={"HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["retries"] == {"value": 9, "source": f"file {path}"}


# Options of `serve` that are actions or meta, not settings a config file should hold.
NOT_SETTINGS = {"help", "config", "print_unit"}


def test_every_serve_flag_has_a_config_key() -> None:
    # "A config file for serve with the same keys as the flags": fails when a flag is
    # added to `nattool serve` without a [serve] key here.
    from nattool.cli.app import app as nattool_app

    command = typer.main.get_command(nattool_app).commands["serve"]  # type: ignore[attr-defined]
    flags = {
        p.name
        for p in command.params
        if any(o.startswith("--") for o in p.opts) and p.name not in NOT_SETTINGS
    }
    keys = {k.split(".", 1)[1] for k in KEYS if k.startswith("serve.")}
    assert flags, "no serve options found"
    assert flags <= keys, f"serve flags without a [serve] config key: {sorted(flags - keys)}"
    for key in flags:
        assert KEYS[f"serve.{key}"].flag in command.params[[p.name for p in command.params].index(key)].opts


def test_a_bad_list_item_is_named_alone(tmp_path: Path) -> None:
    """One wrong tracker in a list is one plain sentence, not wrapped in the list's type."""
    path = write(tmp_path, 'trackers = ["a.example", "[::1]:0"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_path=str(path), environ=env(tmp_path))
    assert str(info.value).endswith("key 'trackers': bad tracker '[::1]:0': port 0 out of range 1..65535")
    assert "array" not in str(info.value) and "expected" not in str(info.value)
