"""``python -m localregistry``: run a token server + registry until interrupted.

Prints one JSON line with the addresses, for scripts to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import tempfile
import threading
from pathlib import Path

from .registry import Registry
from .tlsca import TestCA
from .token_server import TokenServer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run a local CNCF distribution registry.")
    p.add_argument("--workdir", type=Path, help="config/storage/log dir (default: a temp dir)")
    p.add_argument("--auth", choices=["token", "htpasswd", "none"], default="token")
    p.add_argument("--user", action="append", default=[], metavar="USER:PASS")
    p.add_argument("--service", default="localregistry")
    p.add_argument("--port", type=int, help="registry port (default: a free one)")
    p.add_argument("--expires-in", type=int, default=300)
    p.add_argument("--log-level", default="warn")
    p.add_argument("--public-host", default="127.0.0.1",
                   help="host name in the advertised addresses (must resolve to 127.0.0.1)")
    p.add_argument("--tls", action="store_true",
                   help="serve HTTPS with a fresh test CA (WORKDIR/ca/ca.crt, a containers cert dir)")
    args = p.parse_args(argv)

    users = dict(u.split(":", 1) for u in args.user)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="localregistry-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with contextlib.ExitStack() as stack:
        ts = None
        ca = TestCA(workdir / "ca") if args.tls else None
        tls = ca.issue([args.public_host], workdir / "tls") if ca else None
        if args.auth == "token":
            ts = stack.enter_context(TokenServer(args.service, users, expires_in=args.expires_in,
                                                 tls=tls, public_host=args.public_host))
        reg = stack.enter_context(Registry(
            workdir, None if args.auth == "none" else args.auth, token_server=ts,
            htpasswd_users=users if args.auth == "htpasswd" else None,
            port=args.port, log_level=args.log_level, tls=tls, public_host=args.public_host))
        info = {"url": reg.url, "host": reg.host, "workdir": str(workdir), "log": str(reg.log_path)}
        if ca:
            info |= {"ca_cert": str(ca.cert_path), "cert_dir": str(ca.cert_dir)}
        if ts:
            info |= {"realm": ts.realm, "service": ts.service, "issuer": ts.issuer}
        print(json.dumps(info), flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
