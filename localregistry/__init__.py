"""A real CNCF distribution registry with real token auth, on loopback.

Used by the test suite and the embedded default run script:

    with TokenServer("localregistry", {"alice": "pw"}) as ts, \\
         Registry(workdir, "token", token_server=ts) as reg:
        image = make_oci_layout(workdir / "img", [1024, 4096])
        skopeo.copy(image.ref, f"docker://{reg.host}/test/abc:v1", dest_creds="alice:pw")
"""

from . import skopeo
from .images import Layer, OciImage, make_oci_layout
from .registry import (
    Registry,
    RegistryError,
    bcrypt_htpasswd_line,
    find_registry_binary,
    free_port,
    token_auth_registry,
)
from .token_server import FetchRecord, Scope, TokenServer, parse_scope

__all__ = [
    "FetchRecord", "Layer", "OciImage", "Registry", "RegistryError", "Scope", "TokenServer",
    "bcrypt_htpasswd_line", "find_registry_binary", "free_port", "make_oci_layout",
    "parse_scope", "skopeo", "token_auth_registry",
]
