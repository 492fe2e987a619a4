"""The client functions' default timing, which the command line's help states too.

Apart from :mod:`nattool.api` so that building the command line (help, completion)
reads them without importing the client machinery.
"""

from __future__ import annotations

DEFAULT_TIMEOUT = 2.0
DEFAULT_RETRIES = 3
PROBE_TIMEOUT = 1.0  # the probe waits this long in each of its (up to) three phases
PROBE_RETRIES = 2
