"""TURN credentials: long-term keys, static users, the REST secret convention, group
credentials and stateless nonces."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

from nattool.protocol.stun import long_term_key
from nattool.protocol.turn_auth import (
    CredentialStore,
    NonceMint,
    grant_group_credentials,
    group_tag,
    is_group_username,
    rest_password,
)

NOW = 1_800_000_000
IP = ipaddress.ip_address("198.51.100.7")


def test_long_term_key_is_md5_of_user_realm_password() -> None:
    assert long_term_key("user", "realm", "pass") == hashlib.md5(b"user:realm:pass").digest()


def test_rest_password_is_coturns() -> None:
    # coturn's turnutils_uclient -W computes base64(HMAC-SHA1(secret, "EXPIRY:NAME")).
    want = base64.b64encode(hmac.new(b"north", b"1800000600:bob", hashlib.sha1).digest()).decode()
    assert rest_password(b"north", "1800000600:bob") == want


def test_static_users() -> None:
    store = CredentialStore("nattool", {"alice": "pw"})
    key = store.key_for("alice", NOW)
    assert key is not None and key.key == long_term_key("alice", "nattool", "pw") and key.group is None
    assert store.key_for("bob", NOW) is None
    assert store.enabled
    assert not CredentialStore("nattool").enabled


def test_rest_usernames_expire() -> None:
    store = CredentialStore("nattool", rest_secret=b"north")
    fresh = f"{NOW + 60}:bob"
    key = store.key_for(fresh, NOW)
    assert key is not None and key.key == long_term_key(fresh, "nattool", rest_password(b"north", fresh))
    assert store.key_for(f"{NOW + 60}", NOW) is not None  # coturn allows a bare timestamp too
    assert store.key_for(f"{NOW - 1}:bob", NOW) is None
    assert store.key_for(f"{NOW - 1}:bob", NOW, check_expiry=False) is not None
    assert store.key_for("bob", NOW) is None
    assert store.key_for("bob:1800000060", NOW) is None


def test_group_credentials() -> None:
    relay_secret = b"r" * 32
    store = CredentialStore("nattool", rest_secret=b"north", relay_secret=relay_secret)
    user, password = grant_group_credentials(relay_secret, "friends", NOW, 3600)
    tag = group_tag(relay_secret, "friends")
    assert user == f"{NOW + 3600}:g:{tag}" and len(tag) == 16 and is_group_username(user)
    assert tag == hmac.new(relay_secret, b"friends", hashlib.sha256).hexdigest()[:16]
    key = store.key_for(user, NOW)
    assert key is not None and key.group == tag
    assert key.key == long_term_key(user, "nattool", password)
    assert store.key_for(user, NOW + 3601) is None
    # A group-shaped name is never checked against the REST secret, and never without --relay.
    assert CredentialStore("nattool", rest_secret=b"north").key_for(user, NOW) is None
    assert group_tag(relay_secret, "others") != tag


def test_nonces() -> None:
    mint = NonceMint(b"n" * 32)
    nonce = mint.make(IP, 100.0)
    assert len(nonce) == 32
    assert mint.valid(nonce, IP, 100.0)
    assert mint.valid(nonce, IP, 699.0)
    assert not mint.valid(nonce, IP, 701.0)  # 10 minutes
    assert not mint.valid(nonce, ipaddress.ip_address("198.51.100.8"), 100.0)  # another client
    assert not NonceMint(b"m" * 32).valid(nonce, IP, 100.0)  # another server
    forged = f"{0xFFFFFFF0:08x}" + nonce[8:]
    assert not mint.valid(forged, IP, 100.0)
    assert not mint.valid("not a nonce", IP, 100.0)
    assert not mint.valid(nonce.upper(), IP, 100.0)
    # An IPv4-mapped source is the same client as the IPv4 one.
    assert mint.valid(nonce, ipaddress.ip_address("::ffff:198.51.100.7"), 100.0)
