"""Settings from flags > environment > config file > defaults, each with its source.

One TOML file (``--config``, else ``NATTOOL_CONFIG``, else the platform config dir)::

    trackers = ["tracker.example.org", "[2001:db8::1]:43283"]
    # domain = "example.org"        # or find trackers by SRV _nattracker._udp.example.org
    timeout = 2.0
    retries = 3
    # dns_server = "127.0.0.1:5353"

    [serve]
    port = 43283
    ttl = 120
    store = "sqlite:/var/lib/nattool/tracker.db"

``trackers`` and ``domain`` are one decision ("where do the trackers come from"): the
highest layer that sets either of them decides both, so ``--domain`` on the command line
is not silently mixed with trackers from the config file.

Every bad value raises :class:`ConfigError` naming where it came from, the key, and the
expected type. Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from nattool.errors import ConfigError, UsageError
from nattool.logs import LOG_LEVELS
from nattool.protocol.endpoint import DEFAULT_PORT
from nattool.protocol.tracker_spec import TrackerSpec, parse_tracker_list, parse_tracker_spec

APP_NAME = "nattool"
CONFIG_FILE_NAME = "config.toml"
ENV_CONFIG = "NATTOOL_CONFIG"


class _Bad(Exception):
    """Internal: a value of the wrong type or range; the caller adds where it came from."""


class _BadItem(_Bad):
    """Internal: one item of a list is wrong; the message names it, whole."""


# --------------------------------------------------------------------------- validators


def _v_number(positive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad("a number" + (" > 0" if positive else " >= 0"))
        value = float(value)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise _Bad("a number" + (" > 0" if positive else " >= 0"))
        return value

    return check


def _v_int(low: int, high: Optional[int] = None) -> Callable[[Any], int]:
    want = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(want)
        if value < low or (high is not None and value > high):
            raise _Bad(want)
        return value

    return check


def _v_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string")
    return value.strip()


def _v_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _v_str_or_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Bad("a string or a list of strings")
    if not all(v.strip() for v in value):
        raise _BadItem("an empty value")
    return tuple(v.strip() for v in value)


def _v_trackers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Bad('a list of strings such as ["tracker.example.org:43283"]')
    out = []
    for item in value:
        try:
            out.append(parse_tracker_spec(item).to_text())
        except UsageError as exc:
            raise _BadItem(str(exc)) from None
    return tuple(out)


def _v_domain(value: Any) -> str:
    text = _v_str(value)
    try:
        spec = parse_tracker_spec(text, schemes=())
    except UsageError:
        raise _Bad("a DNS domain name such as example.org") from None
    if spec.ip is not None or ":" in text:
        raise _Bad("a DNS domain name such as example.org")
    return spec.host


def _v_dns_server(value: Any) -> str:
    text = _v_str(value)
    try:
        spec = parse_tracker_spec(text, default_port=53, schemes=())
    except UsageError:
        raise _Bad("an IP address with optional port, such as 127.0.0.1:5353 or [::1]:53") from None
    if spec.ip is None:
        raise _Bad("an IP address (not a host name), such as 127.0.0.1:5353 or [::1]:53")
    return spec.to_text()


def _v_log_level(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LOG_LEVELS:
        raise _Bad("one of " + ", ".join(LOG_LEVELS))
    return value.strip().lower()


def _v_metrics(value: Any) -> str:
    # "ADDR:PORT", or a bare port (loopback), written as a number or a string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(_v_int(1, 65535)(value))
    return _v_str(value)


# Environment variables hold text; these turn the text into what the validator wants.
def _env_list(text: str) -> list[str]:
    return [spec.to_text() for spec in parse_tracker_list(text)]


def _env_number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        raise _Bad("a number") from None


def _env_int(text: str) -> Any:
    try:
        return int(text, 10)
    except ValueError:
        raise _Bad("an integer") from None


@dataclass(frozen=True, slots=True)
class KeyDef:
    key: str
    validate: Callable[[Any], Any]
    default: Any
    help: str
    env: Optional[str] = None
    env_parse: Callable[[str], Any] = lambda text: text

    @property
    def flag(self) -> str:
        if self.key == "trackers":
            return "--tracker"
        return "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")


KEYS: dict[str, KeyDef] = {
    k.key: k
    for k in (
        KeyDef("trackers", _v_trackers, (), "trackers to ask", "NATTOOL_TRACKERS", _env_list),
        KeyDef("domain", _v_domain, None, "find trackers by SRV/A/AAAA of this domain", "NATTOOL_DOMAIN"),
        KeyDef("timeout", _v_number(positive=True), 2.0, "seconds to wait for an answer", "NATTOOL_TIMEOUT", _env_number),
        KeyDef("retries", _v_int(0, 100), 3, "retries after the first try", "NATTOOL_RETRIES", _env_int),
        KeyDef("dns_server", _v_dns_server, None, "DNS server IP[:PORT] (default: system)", "NATTOOL_DNS_SERVER"),
        KeyDef("serve.host", _v_str_or_list, (), "addresses to listen on (default: all)"),
        KeyDef("serve.port", _v_int(0, 65535), DEFAULT_PORT, "UDP port to listen on"),
        KeyDef("serve.ttl", _v_number(positive=True), 120.0, "seconds a registration lives"),
        KeyDef("serve.rate_limit", _v_number(positive=False), 50.0, "requests/s per source (0: off)"),
        KeyDef("serve.burst", _v_number(positive=True), None, "requests at once before the rate applies (default 2 x rate)"),
        KeyDef("serve.store", _v_str, "sqlite:", "memory, sqlite:PATH or redis://HOST:PORT/DB", "NATTOOL_STORE"),
        KeyDef("serve.alt_host", _v_str, None, "RFC 5780 alternate address"),
        KeyDef("serve.alt_port", _v_int(1, 65535), None, "RFC 5780 alternate port"),
        KeyDef("serve.no_stun", _v_bool, False, "do not answer STUN"),
        KeyDef("serve.public", _v_str, None, "HOST:PORT this tracker announces"),
        KeyDef("serve.join", _v_trackers, (), "trackers to federate with"),
        KeyDef("serve.tracker_ttl", _v_number(positive=True), 300.0, "seconds a verified tracker stays listed"),
        KeyDef("serve.announce_interval", _v_number(positive=True), 60.0, "seconds between announcements"),
        KeyDef("serve.max_members", _v_int(1), 1_000_000, "live members in the whole tracker"),
        KeyDef("serve.max_group_members", _v_int(1), 1024, "members per group"),
        KeyDef("serve.max_groups_per_source", _v_int(1), 64, "groups one source may be a member of"),
        KeyDef("serve.log_level", _v_log_level, "info", "log level"),
        KeyDef("serve.metrics", _v_metrics, None, "Prometheus endpoint [ADDR:]PORT"),
        KeyDef("serve.workers", _v_int(1, 1024), 1, "processes sharing the port"),
        KeyDef("serve.coalesce_us", _v_int(0, 10_000), 400, "microseconds a busy server may wait to answer requests in batches (0: never)"),
        KeyDef("serve.tcp", _v_bool, None, "listen on TCP on the tracker port too (default: with TURN or --relay)"),
        KeyDef("serve.relay", _v_bool, False, "relay for the members of a group (TURN credentials via //relay/GROUP)"),
        KeyDef("serve.turn_user", _v_str_or_list, (), "TURN long-term credentials NAME:PASSWORD"),
        KeyDef("serve.turn_secret", _v_str, None, "TURN REST API shared secret", "NATTOOL_TURN_SECRET"),
        KeyDef("serve.realm", _v_str, "nattool", "TURN realm"),
        KeyDef("serve.relay_ip", _v_str_or_list, (), "address of relayed sockets, one per family (default: --host, else the route's source)"),
        KeyDef("serve.relay_ports", _v_str, "49152-65535", "port range LOW-HIGH of relayed sockets"),
        KeyDef("serve.allow_peer", _v_str_or_list, (), "CIDR a relay may reach despite the default deny list"),
        KeyDef("serve.deny_peer", _v_str_or_list, (), "CIDR a relay may not reach"),
        KeyDef("serve.max_allocations", _v_int(1), 1000, "TURN allocations in the whole server"),
        KeyDef("serve.user_quota", _v_int(1), 10, "TURN allocations per username"),
        KeyDef("serve.source_quota", _v_int(1), 10, "TURN allocations per client IP address"),
        KeyDef("serve.relay_bandwidth", _v_number(positive=False), 1_000_000.0, "bytes/s relayed per allocation (0: unlimited)"),
    )
}

# The two keys that together say where trackers come from (see module docstring).
_TRACKER_SOURCE_KEYS = ("trackers", "domain")


# ------------------------------------------------------------------------------ paths


def default_config_path(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """The platform's per-user config file (it may not exist)."""
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    if platform == "win32":
        appdata = environ.get("APPDATA")
        base = Path(appdata) if appdata else home / "AppData" / "Roaming"
        return base / APP_NAME / CONFIG_FILE_NAME
    if platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME / CONFIG_FILE_NAME
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".config"
    return base / APP_NAME / CONFIG_FILE_NAME


def config_path_in_use(
    config_path: Optional[str | os.PathLike[str]], environ: Mapping[str, str]
) -> tuple[Path, str, bool]:
    """(path, where the path came from, whether it was named explicitly)."""
    if config_path is not None and str(config_path) != "":
        return _absolute(Path(config_path).expanduser()), "flag --config", True
    if environ.get(ENV_CONFIG):
        return _absolute(Path(environ[ENV_CONFIG]).expanduser()), f"env {ENV_CONFIG}", True
    return default_config_path(environ), "default", False


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    value: Any
    source: str  # "flag", "env NATTOOL_X", "file /path", "default", or "unset (...)"


class Settings:
    """The effective settings. Values are immutable (lists become tuples)."""

    def __init__(
        self,
        values: dict[str, Setting],
        *,
        config_path: Path,
        config_path_source: str,
        config_loaded: bool,
    ) -> None:
        self._values = values
        self.config_path = config_path
        self.config_path_source = config_path_source
        self.config_loaded = config_loaded  # False: no file there (fine for the default path)

    def get(self, key: str) -> Any:
        return self._values[key].value

    def source(self, key: str) -> str:
        return self._values[key].source

    def items(self) -> list[Setting]:
        return [self._values[k] for k in KEYS]

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.items())

    # Conveniences for the commands.
    def tracker_specs(self) -> list[TrackerSpec]:
        return [parse_tracker_spec(text) for text in self.get("trackers")]

    def resolver_address(self) -> Optional[tuple[str, int]]:
        """The DNS server to use, as resolve_*(resolver_address=...) wants; None: system."""
        text = self.get("dns_server")
        if text is None:
            return None
        spec = parse_tracker_spec(text, default_port=53, schemes=())
        return (spec.host, spec.port)

    def serve(self) -> dict[str, Any]:
        """The [serve] settings without the prefix: {"port": 43283, ...}."""
        return {k.split(".", 1)[1]: s.value for k, s in self._values.items() if k.startswith("serve.")}

    def to_json(self) -> dict[str, Any]:
        return {
            "config_file": {
                "path": str(self.config_path),
                "source": self.config_path_source,
                "loaded": self.config_loaded,
            },
            "settings": {
                s.key: {"value": list(s.value) if isinstance(s.value, tuple) else s.value, "source": s.source}
                for s in self.items()
            },
        }


def load_settings(
    cli_overrides: Mapping[str, object],
    *,
    config_path: Optional[str | os.PathLike[str]],
    environ: Mapping[str, str],
) -> Settings:
    """Merge the layers. ``cli_overrides`` maps setting keys (``"timeout"``,
    ``"serve.port"``) to flag values; None or an empty list means "flag not given"."""
    flags = _from_flags(cli_overrides)
    env = _from_env(environ)
    path, path_source, explicit = config_path_in_use(config_path, environ)
    file_values, loaded = _from_file(path, explicit=explicit, path_source=path_source)
    defaults = {k.key: Setting(k.key, k.default, "default") for k in KEYS.values()}
    layers = [flags, env, file_values, defaults]

    values: dict[str, Setting] = {}
    for key in KEYS:
        values[key] = next(layer[key] for layer in layers if key in layer)

    # Trackers and domain: the highest layer that names either decides both.
    for layer in layers[:-1]:
        present = [k for k in _TRACKER_SOURCE_KEYS if k in layer]
        if present:
            winner = layer[present[0]]
            for key in _TRACKER_SOURCE_KEYS:
                overridden = any(key in lower for lower in layers[layers.index(layer) + 1 : -1])
                if key not in layer and overridden:
                    values[key] = Setting(
                        key, KEYS[key].default, f"unset ({winner.key} from {winner.source} takes precedence)"
                    )
            break

    return Settings(values, config_path=path, config_path_source=path_source, config_loaded=loaded)


def _given(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return False
    return True


def _from_flags(overrides: Mapping[str, object]) -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for key, value in overrides.items():
        if key not in KEYS:
            # A programming error in a command, not a user error: fail loudly.
            raise KeyError(f"unknown setting {key!r} passed as a flag override")
        if not _given(value):
            continue
        definition = KEYS[key]
        try:
            out[key] = Setting(key, definition.validate(value), "flag")
        except _BadItem as bad:
            raise UsageError(f"{definition.flag}: {bad}") from None
        except _Bad as bad:
            raise UsageError(f"{definition.flag}: expected {bad}, got {_show(value)}") from None
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for definition in KEYS.values():
        if definition.env is None:
            continue
        text = environ.get(definition.env)
        if text is None or not text.strip():
            continue  # an empty variable counts as unset, as most tools treat it
        try:
            value = definition.validate(definition.env_parse(text.strip()))
        except _BadItem as bad:
            raise ConfigError(f"environment {definition.env}: {bad}") from None
        except _Bad as bad:
            raise ConfigError(f"environment {definition.env}: expected {bad}, got {_show(text)}") from None
        except UsageError as exc:
            raise ConfigError(f"environment {definition.env}: {exc}") from None
        out[definition.key] = Setting(definition.key, value, f"env {definition.env}")
    return out


def _from_file(path: Path, *, explicit: bool, path_source: str) -> tuple[dict[str, Setting], bool]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} (from {path_source}) does not exist") from None
        return {}, False
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None

    source = f"file {path}"
    out: dict[str, Setting] = {}
    for name, value in data.items():
        if name == "serve":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: key 'serve' must be a table ([serve]), got {_kind(value)}")
            for sub, subvalue in value.items():
                _file_value(out, path, source, f"serve.{sub}", subvalue)
        else:
            _file_value(out, path, source, name, value)
    return out, True


def _file_value(out: dict[str, Setting], path: Path, source: str, key: str, value: Any) -> None:
    definition = KEYS.get(key)
    if definition is None:
        close = difflib.get_close_matches(key, list(KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
    try:
        out[key] = Setting(key, definition.validate(value), source)
    except _BadItem as bad:
        raise ConfigError(f"config file {path}: key {key!r}: {bad}") from None
    except _Bad as bad:
        raise ConfigError(f"config file {path}: key {key!r} must be {bad}, got {_show(value)}") from None


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_kind(value)} {text}" if not isinstance(value, str) else text
