"""A small Docker-registry token server (distribution "token" auth spec).

Implements the parts of https://distribution.github.io/distribution/spec/auth/token/
that registries and clients actually use:

* ``GET /token?service=S&scope=...&scope=...`` with optional HTTP Basic auth;
* the OAuth2 password grant, ``POST /token`` with a form body.

Tokens are RS256 JWTs whose header carries the signing certificate in ``x5c``;
distribution verifies that chain against its ``auth.token.rootcertbundle``,
which is the PEM at :attr:`TokenServer.cert_path`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import json
import logging
import re
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .tlsca import server_context

log = logging.getLogger(__name__)

# access(user, type, name, requested_actions) -> granted actions; user None = anonymous.
AccessPolicy = Callable[[str | None, str, str, list[str]], list[str]]


class Scope(NamedTuple):
    """One parsed ``type[(class)]:name:actions`` scope."""

    type: str
    name: str
    actions: list[str]
    cls: str | None = None


class FetchRecord(NamedTuple):
    """One issued token, as seen by tests."""

    user: str | None
    scopes: tuple[str, ...]
    time: float


class AuthFailure(NamedTuple):
    """One refused token request (unknown user or wrong password)."""

    user: str | None
    time: float


_TYPE_WITH_CLASS = re.compile(r"^([a-z0-9]+)\(([a-z0-9]+)\)$")


def parse_scope(scope: str) -> Scope:
    """Parse ``repository:name:pull,push``.

    The name may itself contain ':' (``localhost:5000/foo``), so split on the
    first and the last colon only.
    """
    first, last = scope.find(":"), scope.rfind(":")
    if first <= 0 or last == first:
        raise ValueError(f"malformed scope {scope!r}")
    rtype, name, actions = scope[:first], scope[first + 1 : last], scope[last + 1 :]
    if not name:
        raise ValueError(f"malformed scope {scope!r}")
    cls = None
    m = _TYPE_WITH_CLASS.match(rtype)
    if m:  # e.g. "repository(plugin)"
        rtype, cls = m.group(1), m.group(2)
    return Scope(rtype, name, [a for a in actions.split(",") if a], cls)


def default_access(user: str | None, rtype: str, name: str, actions: list[str]) -> list[str]:
    """Authenticated users get everything they ask for; anonymous get nothing."""
    return list(actions) if user is not None else []


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, basic_challenge: bool = False):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.basic_challenge = basic_challenge


class TokenServer:
    """Threaded token server on loopback; see module docstring.

    ``expires_in`` is a plain attribute so tests can shorten token life at
    runtime. Note distribution 2.8 adds 60 s of leeway to ``exp``, so a token
    stays usable at the registry for ``expires_in + 60`` seconds.
    """

    def __init__(
        self,
        service: str,
        users: dict[str, str],
        access: AccessPolicy | None = None,
        expires_in: int = 300,
        issuer: str = "localregistry",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        public_host: str | None = None,
    ) -> None:
        """``tls=(cert_path, key_path)`` serves HTTPS. ``public_host`` (default:
        ``host``) is the host name in :attr:`url`/:attr:`realm`, e.g.
        ``registry-a.connector-test`` (which must resolve to the bind address
        and be in the certificate's SANs); :attr:`local_url` always uses the
        bind address."""
        self.service = service
        self.users = dict(users)
        self.access = access or default_access
        self.expires_in = expires_in
        self.issuer = issuer
        self._bind = (host, port)
        self.tls: tuple[Path, Path] | None = (Path(tls[0]), Path(tls[1])) if tls else None
        self.public_host = public_host or host
        self._lock = threading.Lock()
        self._fetches: list[FetchRecord] = []
        self._failures: list[AuthFailure] = []
        self._issued: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self._x5c: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> TokenServer:
        if self._httpd is not None:
            raise RuntimeError("token server already started")
        self._tmpdir = Path(tempfile.mkdtemp(prefix="localregistry-token-"))
        self._key, cert = _make_key_and_cert(self.issuer)
        (self._tmpdir / "token-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

        if self.tls:
            self._httpd = _TLSThreadingHTTPServer(self._bind, _make_handler(self),
                                                  server_context(self.tls))
        else:
            self._httpd = ThreadingHTTPServer(self._bind, _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"token-server-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("token server not started")
        return self._httpd.server_address[1]

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """``SCHEME://PUBLIC_HOST:PORT``: what clients are told to use."""
        return f"{self.scheme}://{_host_for_url(self.public_host)}:{self.port}"

    @property
    def local_url(self) -> str:
        """``SCHEME://BIND_HOST:PORT``: reachable without name resolution."""
        return f"{self.scheme}://{_host_for_url(self._bind[0])}:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def cert_path(self) -> Path:
        """PEM of the signing certificate: the registry's rootcertbundle."""
        if self._tmpdir is None:
            raise RuntimeError("token server not started")
        return self._tmpdir / "token-cert.pem"

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        if self._key is None:
            raise RuntimeError("token server not started")
        return self._key.public_key()

    # -- counters for tests ------------------------------------------------

    @property
    def fetches(self) -> list[FetchRecord]:
        with self._lock:
            return list(self._fetches)

    @property
    def failures(self) -> list[AuthFailure]:
        with self._lock:
            return list(self._failures)

    @property
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def reset(self) -> None:
        with self._lock:
            self._fetches.clear()
            self._failures.clear()
            self._issued.clear()

    # -- token logic ---------------------------------------------------------

    def authenticate(self, user: str | None, password: str | None) -> str | None:
        """Return the user name, None for anonymous; raise on bad credentials."""
        if user is None:
            return None
        if user not in self.users or self.users[user] != password:
            with self._lock:
                self._failures.append(AuthFailure(user, time.time()))
            raise _HTTPError(401, "UNAUTHORIZED", "invalid username or password", basic_challenge=True)
        return user

    def issue(self, user: str | None, scopes: list[str]) -> dict[str, object]:
        """Sign a token for ``user`` granting what the policy allows of ``scopes``."""
        if self._key is None:
            raise RuntimeError("token server not started")
        access: list[dict[str, object]] = []
        for raw in scopes:
            try:
                s = parse_scope(raw)
            except ValueError as e:
                raise _HTTPError(400, "INVALID_REQUEST", str(e)) from None
            granted = self.access(user, s.type, s.name, list(s.actions))
            if not granted:  # e.g. anonymous: still a token, just with empty access
                continue
            entry: dict[str, object] = {"type": s.type, "name": s.name, "actions": list(granted)}
            if s.cls:
                entry["class"] = s.cls
            access.append(entry)

        now = int(time.time())
        expires_in = int(self.expires_in)
        # distribution 2.8 unmarshals "aud" into a plain string (a list makes
        # the token "malformed") and exp/nbf/iat into int64 (no floats).
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + expires_in,
            "nbf": now,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})
        with self._lock:
            self._fetches.append(FetchRecord(user, tuple(scopes), time.time()))
            self._issued.append(token)
        return {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": _rfc3339(now),
        }


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _TLSThreadingHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer over TLS; the handshake runs in the request thread.

    Wrapping the listening socket would handshake inside ``accept()`` on the
    serving thread, so one silent client would stall every other one.
    """

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 ctx: ssl.SSLContext) -> None:
        self.ssl_context = ctx
        super().__init__(addr, handler)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        return self.ssl_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        # Failed handshakes (a client not trusting our CA, a port probe) are
        # expected in tests: log quietly instead of a traceback on stderr.
        log.debug("token server: connection from %s failed", client_address, exc_info=True)


def _make_key_and_cert(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Back-date: Go's x509.Verify rejects a cert that is not yet valid.
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _parse_basic(header: str | None) -> tuple[str | None, str | None]:
    if not header:
        return None, None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise _HTTPError(401, "UNAUTHORIZED", "unsupported authorization scheme", basic_challenge=True)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _HTTPError(400, "INVALID_REQUEST", "malformed basic auth header") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise _HTTPError(400, "INVALID_REQUEST", "malformed basic auth header")
    return user, password


def _split_scopes(values: list[str]) -> list[str]:
    # OAuth2 clients send one space-separated "scope"; GET clients repeat it.
    return [s for v in values for s in v.split(" ") if s]


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real token servers
        timeout = 30  # so idle keep-alive threads do not linger forever
        server_version = "localregistry-token/1"

        def setup(self) -> None:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(self.timeout)
                self.request.do_handshake()
            super().setup()

        def do_GET(self) -> None:
            self._handle(lambda: self._get())

        def do_POST(self) -> None:
            self._handle(lambda: self._post())

        def _get(self) -> dict[str, object]:
            url = urlsplit(self.path)
            if url.path != "/token":
                raise _HTTPError(404, "NOT_FOUND", "not found")
            q = parse_qs(url.query)
            self._check_service(q)
            user = server.authenticate(*_parse_basic(self.headers.get("Authorization")))
            return server.issue(user, _split_scopes(q.get("scope", [])))

        def _post(self) -> dict[str, object]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace")
            if urlsplit(self.path).path != "/token":
                raise _HTTPError(404, "NOT_FOUND", "not found")
            form = parse_qs(body)
            self._check_service(form)
            grant = form.get("grant_type", [""])[0]
            if grant != "password":
                raise _HTTPError(400, "unsupported_grant_type", f"unsupported grant_type {grant!r}")
            user = server.authenticate(form.get("username", [""])[0], form.get("password", [""])[0])
            result = server.issue(user, _split_scopes(form.get("scope", [])))
            result["scope"] = " ".join(_split_scopes(form.get("scope", [])))
            return result

        def _check_service(self, params: dict[str, list[str]]) -> None:
            service = params.get("service", [server.service])[0]
            if service != server.service:
                raise _HTTPError(400, "INVALID_REQUEST", f"unknown service {service!r}")

        def _handle(self, fn: Callable[[], dict[str, object]]) -> None:
            try:
                status, body = 200, fn()
                extra: dict[str, str] = {}
            except _HTTPError as e:
                status = e.status
                body = {"errors": [{"code": e.code, "message": e.message, "detail": None}]}
                extra = {"WWW-Authenticate": f'Basic realm="{server.realm}"'} if e.basic_challenge else {}
            except Exception:  # never leave the client hanging on a bug here
                log.exception("token server error")
                status, body, extra = 500, {"errors": [{"code": "UNKNOWN", "message": "internal error"}]}, {}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run a Docker registry token server.")
    p.add_argument("--service", required=True, help="the registry's auth.token.service")
    p.add_argument("--user", action="append", default=[], metavar="USER:PASS")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--issuer", default="localregistry")
    p.add_argument("--expires-in", type=int, default=300)
    p.add_argument("--cert-out", type=Path, help="copy the signing cert (rootcertbundle) here")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain)")
    p.add_argument("--tls-key", type=Path, help="... and this PEM key")
    p.add_argument("--public-host", help="host name in the advertised url/realm (default: --host)")
    args = p.parse_args(argv)

    users = dict(u.split(":", 1) for u in args.user)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with TokenServer(args.service, users, expires_in=args.expires_in, issuer=args.issuer,
                     host=args.host, port=args.port, public_host=args.public_host,
                     tls=(args.tls_cert, args.tls_key) if args.tls_cert else None) as ts:
        if args.cert_out:
            shutil.copyfile(ts.cert_path, args.cert_out)
        print(json.dumps({"url": ts.url, "realm": ts.realm, "service": ts.service, "issuer": ts.issuer,
                          "rootcertbundle": str(args.cert_out or ts.cert_path)}), flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
