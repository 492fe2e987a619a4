"""The choices of `connect` that its command line offers (pure, and light to import:
building the command line reads them)."""

from __future__ import annotations

from enum import Enum

from nattool.protocol.endpoint import DEFAULT_PORT

#: `nattool connect`'s default local port: the tracker's port + 1. A fixed default is
#: what makes LAN paths work without any tracker change (see connect_rules.lan_candidates).
DEFAULT_CONNECT_PORT = DEFAULT_PORT + 1


class RelayMode(str, Enum):
    """``connect --relay``: when a TURN relay that a tracker offers is used."""

    AUTO = "auto"  # when punching cannot work or found nothing within connect_rules.RELAY_AFTER s
    NEVER = "never"  # never: direct paths only, not even asked for
    ONLY = "only"  # always, and no direct candidates


#: `connect --birthday-rate` and `--birthday-budget` (see nattool.protocol.birthday for
#: the arithmetic): probes per second, and in all (a hit 99.97% of the time, in 20.5 s).
BIRTHDAY_RATE = 100.0
BIRTHDAY_BUDGET = 2048
