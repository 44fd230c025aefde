"""Proxy tokens: issue, verify, and the cache of verified tokens (pure, no proxy)."""

from __future__ import annotations

import time

import jwt

from addons.proxy_token import MAX_VERIFIED, Access, ProxyTokens

KEY = b"k" * 32
PULL = [Access("repository", "team/app", ("pull",))]


def test_a_verified_token_is_served_from_the_cache_with_the_same_claims(monkeypatch):
    tokens = ProxyTokens(KEY)
    token, _ = tokens.issue("system:serviceaccount:ci:builder", "default/harbor", "default/harbor", PULL)
    first = tokens.verify(token)
    assert first is not None and first.subject == "system:serviceaccount:ci:builder"
    decodes = []
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: decodes.append(1))
    assert tokens.verify(token) == first
    assert decodes == []  # no second HMAC


def test_a_cached_token_stops_counting_when_it_expires(monkeypatch):
    now = [time.time()]
    tokens = ProxyTokens(KEY, lifetime=60, clock=lambda: now[0])
    token, _ = tokens.issue("s", "default/harbor", "default/harbor", PULL, now=now[0])
    assert tokens.verify(token) is not None
    now[0] += 61
    decodes = []

    def expired(*args, **kwargs):  # what jwt says of it by then
        decodes.append(1)
        raise jwt.ExpiredSignatureError("expired")

    monkeypatch.setattr(jwt, "decode", expired)
    assert tokens.verify(token) is None
    assert decodes == [1] and token not in tokens._verified


def test_tokens_of_another_key_or_tampered_are_never_cached():
    tokens, other = ProxyTokens(KEY), ProxyTokens(b"o" * 32)
    foreign, _ = other.issue("s", "default/harbor", "default/harbor", PULL)
    assert tokens.verify(foreign) is None
    good, _ = tokens.issue("s", "default/harbor", "default/harbor", PULL)
    head, payload, sig = good.split(".")
    tampered = f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    assert tokens.verify(tampered) is None
    assert tokens._verified == {}


def test_the_cache_is_bounded():
    tokens = ProxyTokens(KEY)
    issued = [tokens.issue(f"s{i}", "default/harbor", "default/harbor", PULL)[0] for i in range(MAX_VERIFIED + 5)]
    for token in issued:
        assert tokens.verify(token) is not None
    assert len(tokens._verified) == MAX_VERIFIED
    assert issued[0] not in tokens._verified and issued[-1] in tokens._verified
