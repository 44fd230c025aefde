"""The client configuration renderer (connector_store/render.py), against golden files.

Golden files live in tests/golden/render/<case>/<file> and are compared byte for byte, including
the set of file names. `UPDATE_GOLDEN=1 pytest tests/test_render.py` rewrites them; read the diff
before committing it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from connector_store.model import Connector, Credentials, build_catalog, parse_address
from connector_store.render import (
    AUTH_USER,
    RenderError,
    RenderRequest,
    forward_proxy_url,
    parse_names,
    proxy_address,
    registry_host,
    render,
    write_files,
)

GOLDEN = Path(__file__).parent / "golden" / "render"

# A fixed, fake ServiceAccount-style token (three base64url parts), so golden files are stable.
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpidWlsZGVyIn0.c2lnbmF0dXJl"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfakeCAcertificateForTestsOnly\n-----END CERTIFICATE-----\n"
NODEPORT = "http://192.168.1.5:31567"
SERVICE = "http://connector-proxy.connectors-system.svc"
FORWARD = "connector-proxy.connectors-system.svc:3128"


def oci(namespace: str, name: str, address: str = "https://harbor.example.com", **kw) -> Connector:
    return Connector(namespace=namespace, name=name, class_name="oci", address=parse_address(address), **kw)


HARBOR = oci("default", "harbor")
DIST = oci("team-a", "dist", "http://registry.team-a.svc:5000")

CASES: dict[str, RenderRequest] = {
    "host_form_single": RenderRequest([HARBOR], TOKEN, names="registry-config,buildkitd"),
    "path_form_nodeport": RenderRequest([HARBOR], TOKEN, names="registry-config,buildkitd", proxy_url=NODEPORT),
    "merged_host_form": RenderRequest([HARBOR, DIST], TOKEN, names="registry-config,buildkitd"),
    "merged_path_form": RenderRequest([HARBOR, DIST], TOKEN, names="registry-config,buildkitd", proxy_url=SERVICE),
    # The seed's two volumes, exactly as written there.
    "seed_docker_config_alias": RenderRequest([HARBOR], TOKEN, names="docker-config"),
    "seed_buildkitd": RenderRequest([HARBOR], TOKEN, names="buildkitd"),
    "exclude_files": RenderRequest(
        [HARBOR], TOKEN, names=" registry-config , !context.token,!connector.status.proxyAddress, !ca.crt",
        ca_pem=CA_PEM,
    ),
    "builtins_forward_proxy_ca": RenderRequest(
        [HARBOR, DIST], TOKEN, names="", proxy_url=NODEPORT, forward_proxy=FORWARD, ca_pem=CA_PEM
    ),
    "https_proxy_url": RenderRequest(
        [HARBOR], TOKEN, names="registry-config,buildkitd,!.env", proxy_url="https://registry-proxy.example.com",
        forward_proxy=FORWARD,
    ),
}


def check_golden(case: str, files: dict[str, bytes]) -> None:
    """Byte-compare `files` with tests/golden/render/<case>/ (or rewrite it when UPDATE_GOLDEN=1)."""
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN") == "1":
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        return
    assert folder.is_dir(), f"no golden files for {case}: run with UPDATE_GOLDEN=1 and review them"
    expected = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert sorted(files) == sorted(expected), f"{case}: rendered file names differ from the golden ones"
    for name, content in files.items():
        assert content == expected[name], f"{case}/{name} differs:\n{content.decode()!s}\n---\n{expected[name].decode()}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    files = render(CASES[case])
    check_golden(case, files)
    assert list(files) == sorted(files)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_twice_is_byte_identical(case):
    request = CASES[case]
    again = RenderRequest(list(request.connectors), request.token, request.names, request.proxy_url,
                          request.forward_proxy, request.ca_pem)
    assert render(request) == render(again) == render(request)


# -- addresses ----------------------------------------------------------------------------------


def test_host_form_address_and_host():
    assert proxy_address(HARBOR) == "http://c-harbor.default.svc.cluster.local/namespaces/default/connectors/harbor"
    assert registry_host(HARBOR) == "c-harbor.default.svc.cluster.local"


@pytest.mark.parametrize("url, host", [
    ("http://192.168.1.5:31567", "192.168.1.5:31567"),
    ("http://192.168.1.5:31567/", "192.168.1.5:31567"),
    ("http://Connector-Proxy.Connectors-System.SVC", "connector-proxy.connectors-system.svc"),
    ("https://registry-proxy.example.com:8443", "registry-proxy.example.com:8443"),
    ("http://[fd00::5]:31567", "[fd00::5]:31567"),
])
def test_path_form_address_and_host(url, host):
    scheme = url.split(":")[0]
    assert registry_host(HARBOR, url) == host
    assert proxy_address(HARBOR, url) == f"{scheme}://{host}/namespaces/default/connectors/harbor"


@pytest.mark.parametrize("url", [
    "192.168.1.5:31567",  # no scheme
    "ftp://proxy",
    "http://user:pw@proxy",
    "http://gw.example.com/registry",  # registry clients need /v2/ at the root
    "http://proxy?x=1",
    "http://proxy:99999",
    "http://",
])
def test_bad_proxy_urls_are_refused(url):
    with pytest.raises(RenderError):
        proxy_address(HARBOR, url)
    with pytest.raises(RenderError):
        render(RenderRequest([HARBOR], TOKEN, names="registry-config", proxy_url=url))


def test_dotted_name_needs_the_path_form():
    dotted = oci("default", "harbor.prod")
    with pytest.raises(RenderError, match="proxy URL"):
        proxy_address(dotted)
    assert proxy_address(dotted, NODEPORT) == f"{NODEPORT}/namespaces/default/connectors/harbor.prod"


def test_forward_proxy_url_encodes_slash_keeps_comma():
    url = forward_proxy_url([HARBOR, DIST], "TOKEN", "proxy:3128")
    assert url == "http://default%2Fharbor,team-a%2Fdist:TOKEN@proxy:3128"
    assert forward_proxy_url([HARBOR], "TOKEN", "http://proxy:3128/") == "http://default%2Fharbor:TOKEN@proxy:3128"


def test_forward_proxy_url_decodes_to_what_the_proxy_expects():
    token = "odd:token@with/chars%"
    parts = urlsplit(forward_proxy_url([HARBOR, DIST], token, "proxy:3128"))
    assert unquote(parts.username) == "default/harbor,team-a/dist"
    assert unquote(parts.password) == token
    assert (parts.hostname, parts.port) == ("proxy", 3128)


@pytest.mark.parametrize("forward", ["http://u:p@proxy:3128", "proxy:3128/x", "socks5://proxy:1080", "proxy:0x"])
def test_bad_forward_proxy_is_refused(forward):
    with pytest.raises(RenderError):
        forward_proxy_url([HARBOR], TOKEN, forward)


# -- file formats -------------------------------------------------------------------------------


def auths(files: dict[str, bytes]) -> dict[str, str]:
    doc = json.loads(files["config.json"])
    assert list(doc) == ["auths"]
    return {host: base64.b64decode(entry["auth"], validate=True).decode() for host, entry in doc["auths"].items()}


def test_config_json_auth_decodes_to_user_and_token():
    assert auths(render(CASES["host_form_single"])) == {"c-harbor.default.svc.cluster.local": f"{AUTH_USER}:{TOKEN}"}


def test_config_json_merges_hosts():
    assert auths(render(CASES["merged_host_form"])) == {
        "c-harbor.default.svc.cluster.local": f"{AUTH_USER}:{TOKEN}",
        "c-dist.team-a.svc.cluster.local": f"{AUTH_USER}:{TOKEN}",
    }
    # Path form: every connector shares the proxy's host, so one entry serves them all.
    assert auths(render(CASES["merged_path_form"])) == {"connector-proxy.connectors-system.svc": f"{AUTH_USER}:{TOKEN}"}


@pytest.mark.parametrize("case, hosts", [
    ("host_form_single", ["c-harbor.default.svc.cluster.local"]),
    ("path_form_nodeport", ["192.168.1.5:31567"]),
    ("merged_host_form", ["c-harbor.default.svc.cluster.local", "c-dist.team-a.svc.cluster.local"]),
    ("merged_path_form", ["connector-proxy.connectors-system.svc"]),
    ("https_proxy_url", []),  # buildkit speaks https to it by default
])
def test_buildkitd_toml_marks_exactly_the_proxy_hosts_http(case, hosts):
    text = render(CASES[case])["buildkitd.toml"].decode()
    doc = tomllib.loads(text)
    assert sorted(doc.get("registry", {})) == sorted(hosts)
    assert all(table == {"http": True} for table in doc.get("registry", {}).values())
    assert set(doc) <= {"registry"}
    assert "insecure-entitlements" not in text


def test_env_file_is_sourceable(tmp_path):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    files = render(CASES["builtins_forward_proxy_ca"])
    env = tmp_path / ".env"
    env.write_bytes(files[".env"])
    out = subprocess.run(
        [sh, "-c", '. "$1" && env', "_", str(env)], capture_output=True, text=True, check=True, env={}
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    proxy = files["http.proxy"].decode()
    assert proxy == f"http://default%2Fharbor,team-a%2Fdist:{TOKEN}@{FORWARD}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert values[name] == proxy
    assert values["no_proxy"] == values["NO_PROXY"] == "localhost,127.0.0.1,::1,192.168.1.5"
    assert files["https.proxy"] == files["http.proxy"]


def test_builtin_value_files():
    files = render(CASES["builtins_forward_proxy_ca"])
    assert files["context.token"] == TOKEN.encode()
    assert files["connector.status.proxyAddress"].decode().splitlines() == [
        f"{NODEPORT}/namespaces/default/connectors/harbor",
        f"{NODEPORT}/namespaces/team-a/connectors/dist",
    ]
    assert files["ca.crt"] == CA_PEM.encode()


def test_token_file_newline_is_dropped():
    assert render(RenderRequest([HARBOR], TOKEN + "\n"))["context.token"] == TOKEN.encode()


def test_duplicate_connectors_render_once_in_first_order():
    files = render(RenderRequest([DIST, HARBOR, DIST], TOKEN, names="registry-config"))
    assert files["connector.status.proxyAddress"].decode().splitlines() == [proxy_address(DIST), proxy_address(HARBOR)]
    assert list(json.loads(files["config.json"])["auths"]) == [registry_host(DIST), registry_host(HARBOR)]


# -- configuration.names ------------------------------------------------------------------------


def test_parse_names():
    assert parse_names("") == ((), frozenset())
    assert parse_names(None) == ((), frozenset())
    assert parse_names(" docker-config ,buildkitd,, registry-config,buildkitd ") == (
        ("registry-config", "buildkitd"), frozenset())
    assert parse_names("registry-config, !ca.crt, ! .env,!ca.crt") == (("registry-config",), frozenset({"ca.crt", ".env"}))
    assert parse_names(".env,context.token") == ((".env", "context.token"), frozenset())


def test_empty_names_mean_builtins_only():
    assert sorted(render(RenderRequest([HARBOR], TOKEN))) == ["connector.status.proxyAddress", "context.token"]


def test_unknown_names_are_listed_with_the_valid_ones():
    with pytest.raises(RenderError) as err:
        render(RenderRequest([HARBOR], TOKEN, names="docker-config,dockerconfig, buildkit,!config.yaml"))
    message = str(err.value)
    assert "'dockerconfig'" in message and "'buildkit'" in message and "'!config.yaml'" in message
    assert "'docker-config'" not in message.split(";")[0]
    for valid in ("registry-config", "docker-config", "buildkitd", ".env", "ca.crt"):
        assert valid in message.split(";", 1)[1]


def test_excluding_a_configuration_name_is_an_error():
    with pytest.raises(RenderError, match="'!docker-config'"):
        parse_names("buildkitd,!docker-config")


def test_exclusion_wins_over_a_named_builtin():
    assert ".env" not in render(RenderRequest([HARBOR], TOKEN, names=".env,!.env", forward_proxy=FORWARD))


def test_env_without_forward_proxy_is_omitted_unless_asked_for():
    files = render(RenderRequest([HARBOR], TOKEN, names="registry-config"))
    assert not {".env", "http.proxy", "https.proxy", "ca.crt"} & set(files)
    for name in (".env", "http.proxy", "https.proxy"):
        with pytest.raises(RenderError, match=rf"'{name}' was asked for but needs the forward proxy address"):
            render(RenderRequest([HARBOR], TOKEN, names=f"registry-config,{name}"))


def test_ca_crt_asked_for_without_ca_is_an_error():
    with pytest.raises(RenderError, match="'ca.crt' was asked for but needs the forward proxy's CA"):
        render(RenderRequest([HARBOR], TOKEN, names="ca.crt", forward_proxy=FORWARD))


# -- refused inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("token, reason", [("", "empty"), ("  \n", "empty"), ("a b", "whitespace"), ("a\nb", "whitespace")])
def test_bad_tokens_are_refused_without_echoing_them(token, reason):
    with pytest.raises(RenderError, match=reason) as err:
        render(RenderRequest([HARBOR], token))
    if token.strip():
        assert token.strip() not in str(err.value)


def test_no_connector_is_an_error():
    with pytest.raises(RenderError, match="no connector"):
        render(RenderRequest([], TOKEN))


def test_other_connector_classes_are_refused():
    git = Connector("default", "github", "git", parse_address("https://github.com"))
    with pytest.raises(RenderError, match="default/github.*'git'"):
        render(RenderRequest([git], TOKEN))


def test_ca_with_private_key_is_refused():
    mitmproxy_ca = "-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----\n" + CA_PEM
    with pytest.raises(RenderError, match="private key"):
        render(RenderRequest([HARBOR], TOKEN, ca_pem=mitmproxy_ca))
    with pytest.raises(RenderError, match="no certificate"):
        render(RenderRequest([HARBOR], TOKEN, ca_pem="not a pem"))


# -- secrets ------------------------------------------------------------------------------------

PASSWORD = "Upstream-S3cret-Password-9f2c"
EVERYTHING = "registry-config,buildkitd,.env,http.proxy,https.proxy,context.token,connector.status.proxyAddress,ca.crt"


def test_rendered_files_never_hold_the_registry_password():
    docs = [
        ("mem", {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector", "metadata": {"name": "harbor"},
                 "spec": {"address": "https://harbor.example.com", "connectorClassName": "oci",
                          "auth": {"name": "tokenAuth", "secretRef": {"name": "harbor-secret"},
                                   "params": [{"name": "repository", "value": "testing/busybox"}]}}}),
        ("mem", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "harbor-secret"},
                 "type": "cpaas.io/distribution-registry-token",
                 "stringData": {"username": "admin", "password": PASSWORD}}),
    ]
    connector = build_catalog(docs).get("default", "harbor")
    assert connector.usable and connector.credentials.password == PASSWORD
    forbidden = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                 base64.b64encode(f"admin:{PASSWORD}".encode()).decode()]
    for proxy_url in (None, NODEPORT):
        files = render(RenderRequest([connector, DIST], TOKEN, names=EVERYTHING, proxy_url=proxy_url,
                                     forward_proxy=FORWARD, ca_pem=CA_PEM))
        assert set(files) == {"config.json", "buildkitd.toml", ".env", "http.proxy", "https.proxy",
                              "context.token", "connector.status.proxyAddress", "ca.crt"}
        blob = b"\n".join(files.values())
        for secret in forbidden:
            assert secret.encode() not in blob


class Tripwire:
    """Credentials that fail the test if the renderer so much as looks at them."""

    def __getattribute__(self, name):
        raise AssertionError(f"the renderer read credentials.{name}")


def test_renderer_never_reads_credentials():
    connector = oci("default", "harbor", credentials=Tripwire(), raw_address="https://admin:pw@harbor.example.com")
    for proxy_url in (None, NODEPORT):
        render(RenderRequest([connector], TOKEN, names=EVERYTHING, proxy_url=proxy_url, forward_proxy=FORWARD,
                             ca_pem=CA_PEM))


def test_request_repr_hides_the_token():
    request = RenderRequest([oci("default", "harbor", credentials=Credentials("basic", "admin", PASSWORD))], TOKEN,
                            ca_pem=CA_PEM)
    assert TOKEN not in repr(request) and PASSWORD not in repr(request)


# -- write_files --------------------------------------------------------------------------------


def test_write_files_round_trip_and_replace(tmp_path):
    out = tmp_path / "out" / "docker"
    files = render(CASES["builtins_forward_proxy_ca"])
    assert sorted(write_files(out, files)) == sorted(files)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # no temporary files left behind
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    # Re-rendering with a fresh token replaces the files in place, leaving others alone.
    (out / "unrelated").write_text("keep")
    fresh = render(RenderRequest(CASES["builtins_forward_proxy_ca"].connectors, "fresh-token"))
    write_files(out, fresh, mode=0o644)
    assert (out / "context.token").read_bytes() == b"fresh-token"
    assert stat.S_IMODE((out / "context.token").stat().st_mode) == 0o644
    assert (out / "unrelated").read_text() == "keep"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b"])
def test_write_files_refuses_paths(tmp_path, name):
    with pytest.raises(ValueError):
        write_files(tmp_path, {name: b"x"})
    assert list(tmp_path.iterdir()) == []
