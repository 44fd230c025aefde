"""Thin wrappers over the skopeo CLI for pushing/inspecting test images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence


class SkopeoError(RuntimeError):
    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def skopeo_binary() -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        raise RuntimeError("skopeo not found; install it with `apt-get install skopeo`")
    return exe


def _run(args: list[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    cmd = [skopeo_binary(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise SkopeoError(cmd, proc.returncode, proc.stderr)
    return proc.stdout


def _tls_args(prefix: str, tls_verify: bool | None, cert_dir: str | os.PathLike[str] | None) -> list[str]:
    # tls_verify None: verify when a cert dir is given (the point of giving
    # one), else not (plain-HTTP loopback registries, the historic default).
    verify = cert_dir is not None if tls_verify is None else tls_verify
    args = [f"--{prefix}tls-verify={str(verify).lower()}"]
    if cert_dir is not None:
        args += [f"--{prefix}cert-dir", str(cert_dir)]
    return args


def copy(src: str, dest: str, *, src_creds: str | None = None, dest_creds: str | None = None,
         tls_verify: bool | None = None, extra: Sequence[str] = (), timeout: float = 300,
         src_cert_dir: str | os.PathLike[str] | None = None,
         dest_cert_dir: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> None:
    """``skopeo copy SRC DEST``; creds are ``user:password``.

    ``*_cert_dir``: a containers/image cert dir (``*.crt`` = trusted CAs,
    e.g. :attr:`localregistry.TestCA.cert_dir`); giving one turns TLS
    verification on unless ``tls_verify`` says otherwise. ``env`` is added
    to the inherited environment (e.g. ``HTTPS_PROXY``).
    """
    args = ["copy"]
    if src.startswith("docker://"):
        args += _tls_args("src-", tls_verify, src_cert_dir)
    if dest.startswith("docker://"):
        args += _tls_args("dest-", tls_verify, dest_cert_dir)
    if src_creds:
        args += ["--src-creds", src_creds]
    if dest_creds:
        args += ["--dest-creds", dest_creds]
    _run([*args, *extra, src, dest], timeout, env)


def inspect(ref: str, *, creds: str | None = None, tls_verify: bool | None = None, raw: bool = False,
            timeout: float = 60, cert_dir: str | os.PathLike[str] | None = None,
            env: Mapping[str, str] | None = None) -> dict:
    """``skopeo inspect [--raw] REF`` parsed as JSON (``cert_dir``/``env`` as for :func:`copy`)."""
    args = ["inspect", *_tls_args("", tls_verify, cert_dir)]
    if creds:
        args += ["--creds", creds]
    if raw:
        args.append("--raw")
    return json.loads(_run([*args, ref], timeout, env))
