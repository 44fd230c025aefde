"""A real CNCF distribution registry with real token auth, on loopback.

Used by the test suite and the embedded default run script:

    with TokenServer("localregistry", {"alice": "pw"}) as ts, \\
         Registry(workdir, "token", token_server=ts) as reg:
        image = make_oci_layout(workdir / "img", [1024, 4096])
        skopeo.copy(image.ref, f"docker://{reg.host}/test/abc:v1", dest_creds="alice:pw")

Over HTTPS under a test host name (see :data:`TEST_HOSTS`, set up by scripts/setup):

    check_test_hosts()
    ca = TestCA(workdir / "ca")
    tls = ca.issue(["registry-a.connector-test"], workdir / "tls")
    with TokenServer("localregistry", {"alice": "pw"}, tls=tls,
                     public_host="registry-a.connector-test") as ts, \\
         Registry(workdir / "reg", "token", token_server=ts, tls=tls,
                  public_host="registry-a.connector-test") as reg:
        skopeo.copy(image.ref, f"docker://{reg.host}/test/abc:v1", dest_creds="alice:pw",
                    dest_cert_dir=ca.cert_dir)
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
from .tlsca import TEST_HOSTS, TestCA, TestHostsError, check_test_hosts
from .token_server import FetchRecord, Scope, TokenServer, parse_scope

__all__ = [
    "TEST_HOSTS", "FetchRecord", "Layer", "OciImage", "Registry", "RegistryError", "Scope",
    "TestCA", "TestHostsError", "TokenServer",
    "bcrypt_htpasswd_line", "check_test_hosts", "find_registry_binary", "free_port",
    "make_oci_layout", "parse_scope", "skopeo", "token_auth_registry",
]
