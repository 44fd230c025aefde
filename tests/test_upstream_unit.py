"""Unit tests for the registry client (addons/registry_client.py, pure): realm safety, token lifetime, single flight."""

from __future__ import annotations

import asyncio
import base64

import pytest

from addons.oci import RealmError, parse_realm
from addons.registry_client import (
    SingleFlightCache,
    TokenResponseError,
    basic_header,
    cache_lifetime,
    parse_token_response,
    realm_refusal,
)
from connector_store.model import parse_address

# ---------------------------------------------------------------- realm_refusal


@pytest.mark.parametrize(
    "address, realm",
    [
        ("https://harbor.example.com", "https://harbor.example.com/service/token"),
        ("https://harbor.example.com", "https://harbor.example.com:8443/token"),
        ("https://HARBOR.example.com", "https://harbor.EXAMPLE.com/token"),
        ("https://registry-1.docker.io", "https://auth.docker.io/token"),
        ("https://harbor.example.com", "https://auth.example.com/token"),
        ("https://harbor.example.com", "https://example.com/token"),
        ("https://example.com", "https://auth.example.com/token"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token"),
        ("http://localhost:5000", "http://localhost:5001/token"),
        ("http://registry.local:5000", "http://registry.local:5001/auth"),
        ("http://registry.example.com", "https://auth.example.com/token"),  # https realm for an http registry is fine
    ],
)
def test_realm_allowed(address, realm):
    assert realm_refusal(parse_address(address), parse_realm(realm)) is None


@pytest.mark.parametrize(
    "address, realm",
    [
        ("https://harbor.example.com", "https://evil.com/token"),
        ("https://harbor.example.com", "https://example.com.evil.com/token"),
        ("https://harbor.example.com", "https://harbor.example.com.evil.com/token"),
        ("https://harbor.example.com", "https://notexample.com/token"),
        ("https://harbor.example.com", "https://harbor.example.com@evil.com/token"),
        ("https://registry-1.docker.io", "https://auth.docker.io.evil.net/token"),
        ("https://harbor.example.com", "http://harbor.example.com/token"),  # plain http for an https registry
        ("https://registry-1.docker.io", "http://auth.docker.io/token"),
        ("http://10.0.0.1:5000", "http://10.0.0.2:5001/token"),  # IP registry, different IP
        ("https://10.0.0.1", "https://0.1/token"),
        ("https://192.168.1.5:5000", "https://168.1.5/token"),
        ("https://harbor.example.com", "ftp://harbor.example.com/token"),
        ("https://harbor.example.com", "/token"),
        ("https://harbor.example.com", ""),
        ("https://harbor.example.com", "not a url"),
    ],
)
def test_realm_refused(address, realm):
    """Refused either by the strict parse (userinfo, odd IP spellings, other schemes) or by the host rules."""
    try:
        reason = realm_refusal(parse_address(address), parse_realm(realm))
    except RealmError as e:
        reason = str(e)
    assert reason
    assert isinstance(reason, str)


def test_realm_refusal_says_why():
    assert "http" in realm_refusal(parse_address("https://h.example.com"), parse_realm("http://h.example.com/token"))
    assert "evil.com" in realm_refusal(parse_address("https://h.example.com"), parse_realm("https://evil.com/token"))


@pytest.mark.parametrize(
    "address, realm",
    [
        # The registrable domain of myreg.co.uk is myreg.co.uk itself (co.uk is a public suffix), so
        # another owner's host under co.uk must not receive the credentials (DESIGN section 4).
        ("https://myreg.co.uk", "https://attacker.co.uk/token"),
        ("https://registry.example.com.au", "https://evil.com.au/token"),
    ],
)
def test_realm_outside_registrable_domain_under_multi_label_public_suffix_refused(address, realm):
    assert realm_refusal(parse_address(address), parse_realm(realm))


# ---------------------------------------------------------------- cache_lifetime


@pytest.mark.parametrize("expires_in, expected", [(60, 30), (300, 270), (3600, 3570), (10, 5), (1, 0.5)])
def test_cache_lifetime_values(expires_in, expected):
    assert cache_lifetime(expires_in) == expected


@pytest.mark.parametrize("expires_in", [1, 5, 30, 59, 60, 61, 120, 900, 86400])
def test_cache_lifetime_is_before_expiry_and_not_too_short(expires_in):
    life = cache_lifetime(expires_in)
    assert life < expires_in
    assert life >= expires_in / 2


def test_basic_header():
    header = basic_header("admin", "p:w")
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]) == b"admin:p:w"


# ---------------------------------------------------------------- SingleFlightCache


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_concurrent_gets_for_one_key_compute_once():
    async def main():
        clock = FakeClock()
        cache = SingleFlightCache(clock)
        release = asyncio.Event()
        calls = 0

        async def compute():
            nonlocal calls
            calls += 1
            await release.wait()
            return f"token-{calls}", 60

        tasks = [asyncio.create_task(cache.get("k", compute)) for _ in range(20)]
        for _ in range(3):
            await asyncio.sleep(0)  # let every task reach its wait
        assert calls == 1
        release.set()
        results = await asyncio.gather(*tasks)
        assert results == ["token-1"] * 20
        assert calls == 1
        assert cache.misses == 1
        # cached afterwards
        assert await cache.get("k", compute) == "token-1"
        assert calls == 1
        assert len(cache) == 1

    asyncio.run(main())


def test_different_keys_compute_separately():
    async def main():
        cache = SingleFlightCache(FakeClock())
        seen = []

        async def compute_for(key):
            async def compute():
                seen.append(key)
                return f"v-{key}", 1000
            return compute

        a, b = await asyncio.gather(cache.get("a", await compute_for("a")), cache.get("b", await compute_for("b")))
        assert (a, b) == ("v-a", "v-b")
        assert sorted(seen) == ["a", "b"]
        assert len(cache) == 2

    asyncio.run(main())


def test_expiry_with_fake_clock_triggers_recompute():
    async def main():
        clock = FakeClock(1000.0)
        cache = SingleFlightCache(clock)
        calls = 0

        async def compute():
            nonlocal calls
            calls += 1
            return f"v{calls}", 30  # seconds

        assert await cache.get("k", compute) == "v1"
        clock.now = 1029.9
        assert await cache.get("k", compute) == "v1"
        assert calls == 1
        clock.now = 1030.0  # expiry reached: not valid any more
        assert await cache.get("k", compute) == "v2"
        assert calls == 2
        clock.now = 1059.0
        assert await cache.get("k", compute) == "v2"
        assert calls == 2

    asyncio.run(main())


def test_zero_ttl_value_is_not_reused():
    async def main():
        clock = FakeClock(1000.0)
        cache = SingleFlightCache(clock)
        calls = 0

        async def compute():
            nonlocal calls
            calls += 1
            return calls, 0  # nothing to keep

        assert await cache.get("k", compute) == 1
        assert await cache.get("k", compute) == 2

    asyncio.run(main())


def test_ttl_counts_from_when_the_computation_started():
    """A slow token fetch must not stretch the token's life: the server's clock started at the request."""

    async def main():
        clock = FakeClock(1000.0)
        cache = SingleFlightCache(clock)
        calls = 0

        async def slow():
            nonlocal calls
            calls += 1
            clock.now += 10  # the token server took 10 s
            return f"v{calls}", 30

        assert await cache.get("k", slow) == "v1"
        clock.now = 1029.0
        assert await cache.get("k", slow) == "v1"
        clock.now = 1031.0  # 1000 + 30 passed, though only 21 s since the answer
        assert await cache.get("k", slow) == "v2"

    asyncio.run(main())


class TokenServerDown(Exception):
    pass


def test_exception_propagates_to_all_waiters_and_is_not_cached():
    async def main():
        cache = SingleFlightCache(FakeClock())
        release = asyncio.Event()
        calls = 0

        async def failing():
            nonlocal calls
            calls += 1
            await release.wait()
            raise TokenServerDown("token server answered 500")

        tasks = [asyncio.create_task(cache.get("k", failing)) for _ in range(5)]
        for _ in range(3):
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert calls == 1
        assert all(isinstance(r, TokenServerDown) for r in results), results
        assert len(cache) == 0

        async def ok():
            nonlocal calls
            calls += 1
            return "fresh", 100

        assert await cache.get("k", ok) == "fresh"
        assert calls == 2

    asyncio.run(main())


def test_single_failure_without_waiters_does_not_leak_unretrieved_exception():
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        cache = SingleFlightCache(FakeClock())

        async def failing():
            raise TokenServerDown("down")

        with pytest.raises(TokenServerDown):
            await cache.get("k", failing)
        import gc
        gc.collect()
        await asyncio.sleep(0)
        assert errors == []

    asyncio.run(main())


def test_cancelled_leader_does_not_fail_its_followers():
    """A client hanging up during a token fetch must not fail the other requests waiting on it."""

    async def main():
        cache = SingleFlightCache(FakeClock())
        release = asyncio.Event()
        calls = 0

        async def compute():
            nonlocal calls
            calls += 1
            await release.wait()
            return "token", 100

        leader = asyncio.create_task(cache.get("k", compute))
        await asyncio.sleep(0)
        follower = asyncio.create_task(cache.get("k", compute))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        release.set()
        result = await asyncio.wait_for(follower, 2)
        assert result == "token"

    asyncio.run(main())


def test_cancelled_follower_does_not_cancel_the_fetch():
    async def main():
        cache = SingleFlightCache(FakeClock())
        release = asyncio.Event()

        async def compute():
            await release.wait()
            return "token", 100

        leader = asyncio.create_task(cache.get("k", compute))
        await asyncio.sleep(0)
        follower = asyncio.create_task(cache.get("k", compute))
        await asyncio.sleep(0)
        follower.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await leader == "token"
        assert follower.cancelled()

    asyncio.run(main())


def test_drop():
    async def main():
        clock = FakeClock()
        cache = SingleFlightCache(clock)
        calls = {"a": 0, "b": 0}

        def computer(name):
            async def compute():
                calls[name] += 1
                return f"{name}{calls[name]}", 100
            return compute

        await cache.get(("default/a", "v1", "pull"), computer("a"))
        await cache.get(("default/a", "v1", "push"), computer("a"))
        await cache.get(("default/b", "v1", "pull"), computer("b"))
        assert len(cache) == 3
        assert cache.drop(lambda k: k[0] == "default/a") == 2
        assert len(cache) == 1
        assert cache.drop(lambda k: k[0] == "default/a") == 0
        # dropped keys are fetched again, the others are not
        assert await cache.get(("default/a", "v1", "pull"), computer("a")) == "a3"
        assert await cache.get(("default/b", "v1", "pull"), computer("b")) == "b1"
        assert calls == {"a": 3, "b": 1}

    asyncio.run(main())


# ---------------------------------------------------------------- one parse for the realm


@pytest.mark.parametrize(
    "realm",
    [
        "http://OTHER\\@REGISTRY/token",  # urlsplit sees REGISTRY, urllib3 connects to OTHER
        "http://user@registry.example.com/token",
        "http://registry.example.com /token",
        "http://registry.example.com/to ken",
        "http://registry.example.com/token\n",
        "http://registry.example.com\t/token",
        "http://[::1",
        "http://registry.example.com/token#frag",
        "http://registry.example.com/%zz",
        "http://régistry.example.com/token",
        "http://0x7f.1/token",
        "http://127.1/token",
        "http://registry.example.com:0/token",
        "http://registry.example.com:65536/token",
        "file:///etc/passwd",
        "//registry.example.com/token",
    ],
)
def test_realms_two_parsers_could_read_differently_are_refused(realm):
    with pytest.raises(RealmError):
        parse_realm(realm)


def test_a_parsed_realm_is_rebuilt_from_its_parts():
    r = parse_realm("HTTPS://Auth.Example.COM:8443/service/token?account=x")
    assert (r.scheme, r.host, r.port, r.target) == ("https", "auth.example.com", 8443, "/service/token?account=x")
    assert r.url == "https://auth.example.com:8443/service/token?account=x"
    assert r.with_query("scope=a") == "/service/token?account=x&scope=a"
    assert parse_realm("http://[::1]:5000/t").netloc == "[::1]:5000"


# ---------------------------------------------------------------- token responses


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"token": "abc", "expires_in": 300}', ("abc", 300.0)),
        (b'{"access_token": "abc"}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": ' + b"9" * 400 + b"}", ("abc", 86400.0)),  # OverflowError before
        (b'{"token": "abc", "expires_in": -5}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": "300"}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": true}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": 1e999}', ("abc", 60.0)),
    ],
)
def test_token_response_lifetimes_are_sane(body, expected):
    assert parse_token_response(body) == expected


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b'{"token": 5}', b'{"token": ""}', b'{"token": "a b"}',
                                  b"\xff", b"[" * 100000])
def test_token_responses_without_a_usable_token_raise_only_token_response_error(body):
    with pytest.raises(TokenResponseError):
        parse_token_response(body)


def test_the_token_cache_is_bounded():
    cache = SingleFlightCache(max_entries=3)

    async def fill():
        for i in range(10):
            async def compute(i=i):
                return i, 60.0
            await cache.get(("k", i), compute)

    import asyncio
    asyncio.run(fill())
    assert len(cache) == 3
    assert cache.peek(("k", 9)) == 9 and cache.peek(("k", 0)) is None


def test_the_registry_client_runs_without_mitmproxy():
    """The status writer and any tool can talk to registries without loading mitmproxy."""
    import subprocess
    import sys

    code = "import sys, addons.registry_client; sys.exit('mitmproxy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parent.parent)).returncode == 0
