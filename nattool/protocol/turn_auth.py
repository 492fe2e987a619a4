"""TURN credentials: RFC 8489 long-term keys, coturn's static users and REST secret,
the tracker's own group credentials, and stateless nonces (docs/PROTOCOL.md section 8).

Pure: the clock comes in as an argument, the secrets from the caller.

- Key = MD5(username ":" realm ":" password) (RFC 8489 section 9.2.2).
- Static users: ``--turn-user NAME:PASSWORD``.
- REST (the TURN REST API convention coturn implements): username ``EXPIRY`` or
  ``EXPIRY:NAME`` (EXPIRY a unix time), password base64(HMAC-SHA1(secret, username));
  an expired one is refused.
- Group credentials (``serve --relay``): username ``<expiry>:g:<tag>``, tag = the first
  16 hex digits of HMAC-SHA256(relay secret, canonical group), password as REST but with
  the server's own relay secret. Such usernames are checked only against that secret.
- Nonces: ``<expiry, 8 hex><HMAC-SHA256(secret, expiry || client ip), 24 hex>``,
  valid 10 minutes (monotonic seconds), bound to the client's IP address.

Expiry of REST and group usernames is checked when an allocation is made; the requests
that follow on the allocation (Refresh, CreatePermission, ChannelBind) need the same
username and a valid MESSAGE-INTEGRITY (an allocation lives on by its refreshes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from nattool.protocol.endpoint import IPAddress, unmap
from nattool.protocol.stun import long_term_key

NONCE_LIFETIME = 600.0
_NONCE_RE = re.compile(r"[0-9a-f]{32}\Z")
_GROUP_USER_RE = re.compile(r"([0-9]{1,12}):g:([0-9a-f]{16})\Z")
_REST_USER_RE = re.compile(r"([0-9]{1,12})(?::(.{1,200}))?\Z", re.DOTALL)


def rest_password(secret: bytes, username: str) -> str:
    """The TURN REST API password: base64(HMAC-SHA1(secret, username))."""
    return base64.b64encode(hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()).decode("ascii")


def group_tag(secret: bytes, group_canonical: str) -> str:
    return hmac.new(secret, group_canonical.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def grant_group_credentials(secret: bytes, group_canonical: str, wall_now: float, lifetime: int) -> tuple[str, str]:
    """(username, password) for members of a group, valid ``lifetime`` seconds."""
    username = f"{int(wall_now) + int(lifetime)}:g:{group_tag(secret, group_canonical)}"
    return username, rest_password(secret, username)


def is_group_username(username: str) -> bool:
    return _GROUP_USER_RE.match(username) is not None


@dataclass(frozen=True, slots=True)
class UserKey:
    """What a username resolves to: the long-term key, and the group tag for group
    credentials (None for operator credentials)."""

    key: bytes
    group: Optional[str] = None


@dataclass
class CredentialStore:
    """Every credential the server accepts. ``relay_secret`` is the server's own
    (random per process) secret for group credentials; None: no ``--relay``."""

    realm: str
    users: Mapping[str, str] = field(default_factory=dict)
    rest_secret: Optional[bytes] = None
    relay_secret: Optional[bytes] = None
    _static_keys: dict[str, bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._static_keys = {name: long_term_key(name, self.realm, pw) for name, pw in self.users.items()}

    @property
    def enabled(self) -> bool:
        return bool(self.users) or self.rest_secret is not None or self.relay_secret is not None

    def key_for(self, username: str, wall_now: float, *, check_expiry: bool = True) -> Optional[UserKey]:
        """The key of a username, or None when it is unknown (or expired)."""
        m = _GROUP_USER_RE.match(username)
        if m is not None:
            if self.relay_secret is None or (check_expiry and int(m.group(1)) < wall_now):
                return None
            password = rest_password(self.relay_secret, username)
            return UserKey(long_term_key(username, self.realm, password), m.group(2))
        key = self._static_keys.get(username)
        if key is not None:
            return UserKey(key)
        if self.rest_secret is not None:
            m = _REST_USER_RE.match(username)
            if m is not None and (not check_expiry or int(m.group(1)) >= wall_now):
                password = rest_password(self.rest_secret, username)
                return UserKey(long_term_key(username, self.realm, password))
        return None


class NonceMint:
    """Stateless nonces: nothing stored per client."""

    def __init__(self, secret: bytes, lifetime: float = NONCE_LIFETIME) -> None:
        self._secret = secret
        self.lifetime = lifetime

    def _mac(self, expiry_hex: str, ip: IPAddress) -> str:
        msg = expiry_hex.encode("ascii") + unmap(ip).packed
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:24]

    def make(self, ip: IPAddress, now: float) -> str:
        expiry_hex = f"{int(now + self.lifetime) & 0xFFFFFFFF:08x}"
        return expiry_hex + self._mac(expiry_hex, ip)

    def valid(self, nonce: str, ip: IPAddress, now: float) -> bool:
        """Made by this mint for this IP and not expired."""
        if _NONCE_RE.match(nonce) is None:
            return False
        expiry_hex = nonce[:8]
        if not hmac.compare_digest(nonce[8:], self._mac(expiry_hex, ip)):
            return False
        expiry = int(expiry_hex, 16)
        return now <= expiry and expiry - now <= self.lifetime + 1
