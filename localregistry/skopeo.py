"""Thin wrappers over the skopeo CLI for pushing/inspecting test images."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence


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


def _run(args: list[str], timeout: float) -> str:
    cmd = [skopeo_binary(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SkopeoError(cmd, proc.returncode, proc.stderr)
    return proc.stdout


def copy(src: str, dest: str, *, src_creds: str | None = None, dest_creds: str | None = None,
         tls_verify: bool = False, extra: Sequence[str] = (), timeout: float = 300) -> None:
    """``skopeo copy SRC DEST``; creds are ``user:password``."""
    args = ["copy"]
    if src.startswith("docker://"):
        args.append(f"--src-tls-verify={str(tls_verify).lower()}")
    if dest.startswith("docker://"):
        args.append(f"--dest-tls-verify={str(tls_verify).lower()}")
    if src_creds:
        args += ["--src-creds", src_creds]
    if dest_creds:
        args += ["--dest-creds", dest_creds]
    _run([*args, *extra, src, dest], timeout)


def inspect(ref: str, *, creds: str | None = None, tls_verify: bool = False, raw: bool = False,
            timeout: float = 60) -> dict:
    """``skopeo inspect [--raw] REF`` parsed as JSON."""
    args = ["inspect", f"--tls-verify={str(tls_verify).lower()}"]
    if creds:
        args += ["--creds", creds]
    if raw:
        args.append("--raw")
    return json.loads(_run([*args, ref], timeout))
