"""Every parser of untrusted input raises only its documented error (or nothing), proved with hypothesis.

Each property runs its parser over a batch of generated inputs per hypothesis example (cheap parsers
are then not dominated by hypothesis' per-example overhead) and counts every call in `COUNTS`, keyed
by parser; `scripts/fuzz` runs these same properties with far more examples and reports those counts.
HYPOTHESIS_PROFILE (tests/security/conftest.py) picks the bounded "ci" or the large "fuzz" profile;
FUZZ_BATCH the largest batch.

Contracts (what each property checks):

- connector_store.model: parse_connector, parse_secret, credentials_from_secret, parse_address and
  flatten raise only ManifestError, naming the field; build_catalog never raises;
  connector_store.files.parse_manifests (one file's bytes) raises only ManifestError, and
  DirectoryStore.refresh never raises for any file content.
- addons.client_auth.parse_client_credential, addons.forward.parse_proxy_authorization,
  addons.oci.parse_www_authenticate, addons.oci.required_scopes (for a parsed path), addons.oci.has_body,
  addons.routing.parse_host_form, addons.routing.translate_mount_query, addons.rewrite.rewrite_url and
  rewrite_link never raise; addons.oci.parse_realm raises only RealmError, addons.oci.parse_api_path
  and addons.routing.route_request only ProtocolError, addons.registry_client.parse_token_response only
  TokenResponseError.

The addons are imported inside each property, so one module that does not import fails only its own
properties.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from connector_store import model
from connector_store.files import DirectoryStore, parse_manifests
from connector_store.model import Catalog, Connector, Credentials, ManifestError, Secret

COUNTS: Counter[str] = Counter()  # parser label -> calls made (read by scripts/fuzz)
BATCH = int(os.environ.get("FUZZ_BATCH", "8"))

SEED_PATH = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "seed" / "harbor.yaml"
SEED_TEXT = SEED_PATH.read_text()
SEED_CONNECTOR, SEED_SECRET = yaml.safe_load_all(SEED_TEXT)
SECRET_MARK = "Sup3r-S3cret-fuzz-pw"  # must never show up in an error or a problem
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
K8S_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def addon(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(f"addons.{module}"), attr)


def call(label: str, fn, *args):
    COUNTS[label] += 1
    return fn(*args)


def batch(strategy: st.SearchStrategy, max_size: int | None = None) -> st.SearchStrategy:
    """1..BATCH inputs for one call of a property (at least half of BATCH: hypothesis' lists are short)."""
    size = max_size or BATCH
    return st.lists(strategy, min_size=max(1, size // 2), max_size=size)


# ----------------------------------------------------------------------------- strategies

ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
ANY_TEXT = st.text(ANY_CHAR, max_size=80)
BYTES_AS_TEXT = st.one_of(
    st.binary(max_size=80).map(lambda b: b.decode("utf-8", "surrogateescape")),  # what mitmproxy gives for bytes
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
)
HUGE_DIGITS = st.builds(lambda d, n: d * n, st.sampled_from("0123456789"), st.integers(1, 6000))
ODD_NUMBERS = st.sampled_from([
    "²", "¹²", "١٢٣", "٣", "\u0660", "੫", "0x10", "0o7", "0b1", " 5 ", "-1", "+1", "1_000", "1e3", "1.5", "NaN",
    "inf", "-0", "00000000000000000000001", "18446744073709551616", "", " ", "\t", "\x00",
])


def soup(pieces: list[str], max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings glued from meaningful fragments and arbitrary text: reaches corners random text rarely does."""
    return st.lists(st.one_of(st.sampled_from(pieces), st.text(ANY_CHAR, max_size=5)), max_size=max_size).map("".join)


# YAML gives these scalar types (dates, bytes from !!binary); JSON a subset.
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**200), st.floats(),
    st.text(ANY_CHAR, max_size=30), st.binary(max_size=10), st.dates(), st.datetimes(),
    st.sampled_from(["", "oci", "harbor", "harbor-secret", "https://harbor.example.com", "tokenAuth", "List",
                     "Connector", "Secret", "v1", "YWRtaW4=", "!!!", "name", "value"]),
)
YAML_KEYS = st.one_of(st.text(ANY_CHAR, max_size=12), st.integers(), st.none(), st.booleans(),
                      st.sampled_from(["name", "value", "items", "kind", "password", "username", "auths", "auth"]))


def tree(scalars: st.SearchStrategy, keys: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
        max_leaves=12,
    )


YAML_VALUES = tree(YAML_SCALARS, YAML_KEYS)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(ANY_CHAR, max_size=30),
                         st.sampled_from(["", "harbor.example.com", "dTpw", "robot", "tok"]))
JSON_VALUES = tree(JSON_SCALARS, st.text(ANY_CHAR, max_size=12))

# ----------------------------------------------------------------------------- model: manifests

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
EXTENDED_CONNECTOR = copy.deepcopy(SEED_CONNECTOR)
EXTENDED_CONNECTOR["metadata"]["namespace"] = "team-a"
EXTENDED_CONNECTOR["spec"]["addressExtensions"] = ["harbor-mirror.example.com", "10.0.0.1:5000"]
EXTENDED_CONNECTOR["spec"]["caCertSecretRef"] = {"name": "harbor-ca"}


def _secret(namespace: str, name: str, type_: str, data: dict[str, str]) -> Secret:
    return Secret(namespace, name, type_, data)


SECRETS = {
    "default/harbor-secret": _secret("default", "harbor-secret", model.SECRET_TYPE_REGISTRY_TOKEN,
                                     {"username": "admin", "password": SECRET_MARK}),
    "team-a/harbor-secret": _secret("team-a", "harbor-secret", model.SECRET_TYPE_REGISTRY_TOKEN,
                                    {"username": "admin", "password": SECRET_MARK}),
    "team-a/harbor-ca": _secret("team-a", "harbor-ca", "Opaque", {"ca.crt": CA_PEM}),
}

CONNECTOR_FIELDS = [
    (), ("apiVersion",), ("kind",), ("metadata",), ("metadata", "name"), ("metadata", "namespace"),
    ("spec",), ("spec", "address"), ("spec", "addressExtensions"), ("spec", "addressExtensions", 0),
    ("spec", "connectorClassName"), ("spec", "auth"), ("spec", "auth", "name"), ("spec", "auth", "params"),
    ("spec", "auth", "params", 0), ("spec", "auth", "params", 0, "name"), ("spec", "auth", "params", 0, "value"),
    ("spec", "auth", "secretRef"), ("spec", "auth", "secretRef", "name"), ("spec", "caCertSecretRef"),
    ("spec", "caCertSecretRef", "name"),
]

# The seed Secret with a password no message may ever repeat, as written (stringData) and as the API
# server returns it (base64 data).
MARKED_SECRET = copy.deepcopy(SEED_SECRET)
MARKED_SECRET["stringData"]["password"] = SECRET_MARK
SEED_SECRET_DATA = copy.deepcopy(MARKED_SECRET)
SEED_SECRET_DATA["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in SEED_SECRET_DATA.pop("stringData").items()}
SECRET_FIELDS = [
    (), ("apiVersion",), ("kind",), ("metadata",), ("metadata", "name"), ("metadata", "namespace"), ("type",),
    ("stringData",), ("stringData", "password"), ("stringData", "username"), ("stringData", "token"),
    ("stringData", ".dockerconfigjson"), ("data",), ("data", "password"), ("data", "username"), ("data", "token"),
]


def path_text(path: tuple) -> str:
    """("spec", "auth", "params", 0, "name") -> "spec.auth.params[0].name" (as the error messages say it)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc = copy.copy(doc)  # copies along the path only: the seed documents stay as they are
    node = doc
    for p, following in zip(path, path[1:]):
        if isinstance(node, dict) and p not in node:  # e.g. spec.addressExtensions in the seed
            node[p] = [] if isinstance(following, int) else {}
        node[p] = copy.copy(node[p])
        node = node[p]
    if isinstance(node, list) and path[-1] >= len(node):
        node.append(value)
    else:
        node[path[-1]] = value
    return doc


def check_credentials(c: Credentials) -> None:
    assert c.kind in ("anonymous", "basic", "bearer")
    for s in (c.username, c.password, c.token, c.version):
        assert isinstance(s, str)
        s.encode()  # no lone surrogate gets as far as a header or a hash
    if c.kind == "bearer":
        assert VISIBLE_ASCII.fullmatch(c.token), "a bearer token goes into a header as is"
    if c.kind == "basic":
        assert c.password


def check_connector(c: Connector) -> None:
    assert isinstance(c, Connector)
    for s in (c.namespace, c.name, c.class_name, c.raw_address, c.auth_name):
        assert isinstance(s, str)
        s.encode()
    assert K8S_NAME.fullmatch(c.name) and K8S_NAMESPACE.fullmatch(c.namespace)
    assert all(isinstance(a, str) and a for a in c.address_extensions)
    assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in c.params)
    for ref in (c.secret_name, c.ca_secret_name):
        assert ref is None or (isinstance(ref, str) and ref)
    if c.usable:
        assert c.address is not None and c.credentials is not None
        check_credentials(c.credentials)
    else:
        assert isinstance(c.problem, str) and c.problem and c.reason
        assert SECRET_MARK not in c.problem


def check_manifest_error(e: ManifestError, path: tuple) -> None:
    message = str(e)
    assert message
    assert SECRET_MARK not in message, "an error message repeats a secret"
    if path:
        assert path_text(path) in message, f"{message!r} does not name {path_text(path)!r}"


@given(batch(st.tuples(st.sampled_from([SEED_CONNECTOR, EXTENDED_CONNECTOR]), st.sampled_from(CONNECTOR_FIELDS),
                       YAML_VALUES)))
@example([(SEED_CONNECTOR, ("spec", "auth", "params"), 5)])
@example([(SEED_CONNECTOR, ("spec", "auth"), {"params": 5})])
@example([(SEED_CONNECTOR, ("spec", "addressExtensions"), True)])
@example([(SEED_CONNECTOR, ("spec", "auth", "secretRef"), 5)])
@example([(SEED_CONNECTOR, ("spec", "auth", "params", 0, "value"), None)])
@example([(SEED_CONNECTOR, ("metadata", "name"), "harbor\n")])
@example([(SEED_CONNECTOR, ("spec", "address"), "https://harbor.example.com/\udcff")])
@example([(SEED_CONNECTOR, ("spec", "address"), "http://[::1")])
@example([(SEED_CONNECTOR, ("spec", "address"), "https://ｅxample.com")])
def test_parse_connector_raises_only_manifest_error(cases):
    for base, path, value in cases:
        doc = replaced(base, path, value)
        try:
            c = call("model.parse_connector", model.parse_connector, doc, SECRETS)
        except ManifestError as e:
            check_manifest_error(e, path)
        else:
            check_connector(c)


@given(batch(st.tuples(st.sampled_from([MARKED_SECRET, SEED_SECRET_DATA]), st.sampled_from(SECRET_FIELDS), YAML_VALUES)))
@example([(MARKED_SECRET, ("stringData",), {"password": None})])
@example([(MARKED_SECRET, ("stringData", "password"), "\ud800")])
@example([(SEED_SECRET_DATA, ("data", "password"), "ÿÿÿÿ")])
@example([(SEED_SECRET_DATA, ("data",), {1: "YQ=="})])
@example([(MARKED_SECRET, ("type",), ["x"])])
def test_parse_secret_raises_only_manifest_error(cases):
    for base, path, value in cases:
        doc = replaced(base, path, value)
        try:
            s = call("model.parse_secret", model.parse_secret, doc)
        except ManifestError as e:
            check_manifest_error(e, path)
            continue
        assert isinstance(s, Secret) and isinstance(s.type, str)
        for k, v in s.data.items():
            assert isinstance(k, str) and isinstance(v, str)
            (k + v).encode()


ADDRESSES = [model.parse_address(a) for a in (
    "https://harbor.example.com", "harbor.example.com:5000", "http://127.0.0.1:5000", "http://[::1]:5000",
    "https://art.example.com/artifactory/api/docker/repo",
)]
AUTHS_KEYS = st.one_of(
    st.sampled_from(["harbor.example.com", "https://harbor.example.com/v1/", "harbor.example.com:443",
                     "harbor.example.com:5000", "127.0.0.1:5000", "[::1]:5000", "http://[::1", "[::1", "//",
                     "art.example.com", "https://u:p@harbor.example.com"]),
    st.text(ANY_CHAR, max_size=20),
)
B64_USERPASS = st.builds(lambda u, p: base64.b64encode(f"{u}:{p}".encode("utf-8", "surrogatepass")).decode(),
                         st.text(ANY_CHAR, max_size=8), st.text(ANY_CHAR, max_size=8))
AUTH_ENTRY = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({}, optional={
        "auth": st.one_of(B64_USERPASS, JSON_VALUES, st.text(ANY_CHAR, max_size=12)),
        "username": st.one_of(st.text(ANY_CHAR, max_size=8), JSON_VALUES),
        "password": st.one_of(st.text(ANY_CHAR, max_size=8), JSON_VALUES),
        "registrytoken": st.one_of(st.text(ANY_CHAR, max_size=8), JSON_VALUES),
        "identitytoken": st.one_of(st.text(ANY_CHAR, max_size=8), JSON_VALUES),
    }),
)
DOCKERCONFIG = st.one_of(
    st.builds(lambda auths: json.dumps({"auths": auths}), st.one_of(JSON_VALUES, st.dictionaries(AUTHS_KEYS, AUTH_ENTRY, max_size=3))),
    st.builds(json.dumps, JSON_VALUES),
    st.text(ANY_CHAR, max_size=40),
    st.builds(lambda n: "[" * n, st.integers(1, 100_000)),
)
SECRET_DATA = st.one_of(
    st.builds(lambda d: {".dockerconfigjson": d}, DOCKERCONFIG),
    st.dictionaries(st.sampled_from(["username", "password", "token", "ca.crt", ".dockerconfigjson", "x"]),
                    st.one_of(st.text(ANY_CHAR, max_size=20), st.sampled_from(["admin", SECRET_MARK, "tok\n", "a b"])),
                    max_size=4),
)
SECRET_TYPES = st.one_of(st.sampled_from([model.SECRET_TYPE_DOCKERCONFIGJSON, model.SECRET_TYPE_REGISTRY_TOKEN,
                                          model.SECRET_TYPE_BASIC_AUTH, "Opaque"]), st.text(ANY_CHAR, max_size=12))


@given(batch(st.tuples(SECRET_TYPES, SECRET_DATA, st.sampled_from(ADDRESSES))))
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":[1]}'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '[1]'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": "[" * 100_000}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":{"harbor.example.com":{"auth":5}}}'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":{"harbor.example.com":{"auth":"\u00e9"}}}'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":{"harbor.example.com":{"registrytoken":7}}}'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":{"harbor.example.com":{"password":"\\ud800"}}}'}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":{"http://[::1":{}}}'}, ADDRESSES[0])])
@example([("Opaque", {"token": "tok\r\nX-Injected: 1"}, ADDRESSES[0])])
@example([(model.SECRET_TYPE_REGISTRY_TOKEN, {"username": "u", "password": "\udcff"}, ADDRESSES[0])])
def test_credentials_from_secret_raises_only_manifest_error(cases):
    for type_, data, address in cases:
        s = Secret("default", "harbor-secret", type_, data)
        try:
            c = call("model.credentials_from_secret", model.credentials_from_secret, s, address)
        except ManifestError as e:
            assert str(e) and SECRET_MARK not in str(e)
        else:
            check_credentials(c)


ADDRESS_TEXT = st.one_of(
    ANY_TEXT,
    soup(["https://", "http://", "ftp://", "harbor.example.com", "HARBOR.example.com", "[::1]", "[", "]", "127.0.0.1",
          ":", ":5000", ":99999", ":0", "@", "u:p@", "/", "/v2", "/v2/", "?", "#", "%2f", " ", "\n", "\t", "\x00",
          "ｅ", "℀", "\udcff", "..", "-", "a" * 64]),
)


@given(batch(ADDRESS_TEXT))
@example(["http://[::1"])
@example(["https://ｅxample.com"])
@example(["https://℀.example.com"])
@example(["https://harbor.example.com/\udcff"])
@example(["https://harbor.example.com/a b"])
@example([None, 42, b"https://h", ["x"]])
def test_parse_address_raises_only_manifest_error(values):
    for value in values:
        try:
            a = call("model.parse_address", model.parse_address, value)
        except ManifestError as e:
            assert str(e)
            continue
        assert a.scheme in ("http", "https") and 0 < a.port < 65536
        for s in (a.host, a.path_prefix, a.origin, str(a)):
            assert isinstance(s, str) and s.isascii() and s.isprintable() and " " not in s


def list_doc(kind: str, items: Any) -> dict:
    return {"apiVersion": "v1", "kind": kind, "items": items}


FLATTEN_DOCS = st.recursive(
    st.one_of(YAML_VALUES, st.sampled_from([SEED_CONNECTOR, SEED_SECRET])),
    lambda children: st.one_of(
        st.builds(list_doc, st.sampled_from(["List", "ConnectorList", "SecretList", "List "]),
                  st.one_of(st.lists(children, max_size=4), YAML_VALUES)),
        st.lists(children, max_size=3),
    ),
    max_leaves=10,
)


def recursive_list_doc() -> dict:
    doc = list_doc("List", [])
    doc["items"].append(doc)  # what `&a {kind: List, items: [*a]}` loads as
    return doc


def nested_lists(depth: int) -> dict:
    doc: dict = list_doc("List", [SEED_CONNECTOR])
    for _ in range(depth):
        doc = list_doc("List", [doc])
    return doc


@given(batch(st.lists(FLATTEN_DOCS, max_size=4)))
@example([[list_doc("List", 5)]])
def test_flatten_raises_only_manifest_error(cases):
    for docs in cases:
        try:
            out = call("model.flatten", lambda d: list(model.flatten(d)), docs)
        except ManifestError as e:
            assert str(e)
            continue
        assert all(isinstance(d, dict) for d in out)


def test_flatten_recursive_and_deep_lists():
    # not hypothesis examples: printing a 10,000-deep or cyclic example would itself recurse forever
    for docs in ([recursive_list_doc()], [nested_lists(10_000)]):
        try:
            list(model.flatten(docs))
        except ManifestError as e:
            assert "nested more than" in str(e)
        else:
            raise AssertionError("no ManifestError")
    assert [d["kind"] for d in model.flatten([nested_lists(5)])] == ["Connector"]


CATALOG_DOCS = st.one_of(
    st.builds(replaced, st.sampled_from([SEED_CONNECTOR, EXTENDED_CONNECTOR]), st.sampled_from(CONNECTOR_FIELDS), YAML_VALUES),
    st.builds(replaced, st.sampled_from([MARKED_SECRET, SEED_SECRET_DATA]), st.sampled_from(SECRET_FIELDS), YAML_VALUES),
    st.sampled_from([SEED_CONNECTOR, MARKED_SECRET, EXTENDED_CONNECTOR]),
    YAML_VALUES,
)


@given(batch(st.lists(st.tuples(st.sampled_from(["a.yaml", "b.yaml"]), CATALOG_DOCS), max_size=5)))
def test_build_catalog_never_raises(cases):
    for docs in cases:
        cat = call("model.build_catalog", model.build_catalog, docs)
        assert isinstance(cat, Catalog)
        assert all(isinstance(e, str) and e for e in cat.errors)
        for c in cat.connectors.values():
            check_connector(c)


# ----------------------------------------------------------------------------- files: raw bytes


def billion_laughs(levels: int = 9, width: int = 9) -> bytes:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    top = f"*l{levels - 1}"
    lines += [f"apiVersion: {top}", f"kind: {top}", f"metadata: {{name: {top}, namespace: {top}}}",
              f"spec: {{address: {top}, connectorClassName: {top}, auth: {{params: {top}, name: {top}}}}}",
              f"type: {top}", f"stringData: {{password: {top}}}", f"items: {top}"]
    return "\n".join(lines).encode()


YAML_PIECES = [
    "&a ", "*a", "[", "]", "{", "}", ": ", "- ", "\n", "\n  ", "---\n", "...\n", "kind: List\n", "items: ",
    "kind: Connector\n", "apiVersion: connectors.alauda.io/v1alpha1\n", "kind: Secret\n", "metadata: {name: x}\n",
    "!!binary ", "!!set ", "!!python/object:os.system ", "!!timestamp ", "!!int ", "!!float ", "? ", "<<: ", "2024-13-01",
    "2024-02-30 10:00:00", "0x", "0b_", "0o", "1:60", '"\\ud800"', '"\\x00"', "\t", "'", '"', "|", ">", "#", "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n", "!x ", "\ufeff", "\x85", "\u2028", "\x00", "\x7f", "\udcff", "=", "~", "null", ".nan", ".inf",
]
YAML_BYTES = st.one_of(
    st.binary(max_size=200),
    soup(YAML_PIECES, max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda doc: yaml.safe_dump_all([doc], allow_unicode=True).encode("utf-8", "surrogatepass"), CATALOG_DOCS),
    st.builds(lambda text, cut, junk: text[:cut] + junk + text[cut:],
              st.just(SEED_TEXT.encode()), st.integers(0, len(SEED_TEXT.encode())), st.binary(min_size=1, max_size=4)),
    st.builds(lambda n: b"[" * n, st.integers(1, 300)),
    st.builds(lambda n: b"- " * n, st.integers(1, 300)),
    st.builds(lambda digits: b"a: " + digits.encode(), HUGE_DIGITS),
)


@given(batch(YAML_BYTES, max_size=max(1, BATCH // 2)))
@example([b"\xff\xfe\xfd", b"kind: Connector\nmetadata: {name: \xc3\x28}\n"])
@example([b"&a [*a]", b"&a {kind: List, items: [*a]}", b"kind: List\nitems: 5\n"])
@example([billion_laughs()])
@example([b"[" * 100_000])
@example([b"a: 2024-13-01", b"a: " + b"1" * 5000, b"a: 0b_"])
@example([b"apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: x}\nspec: {auth: {params: 5}}\n"])
@example([b"apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/dockerconfigjson\n"
          b"stringData: {.dockerconfigjson: '{\"auths\":[1]}'}\n"])
def test_parse_manifests_raises_only_manifest_error(files):
    for data in files:
        try:
            docs = call("files.parse_manifests", parse_manifests, data)
        except ManifestError as e:
            assert str(e)
            continue
        assert all(isinstance(d, dict) for d in docs)
        model.build_catalog(("fuzz.yaml", d) for d in docs)  # and what comes out is safe to build from


@given(batch(YAML_BYTES, max_size=1))
@example([b"\xff\xfe\xfd"])
@example([b"&a {kind: List, items: [*a]}"])
@example([b"a: 2024-13-01"])
@example([b"[" * 100_000])
def test_directory_store_reports_a_bad_file_and_loads_the_others(files):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "a-good.yaml").write_text(SEED_TEXT)
        for data in files:
            (directory / "b-fuzz.yaml").write_bytes(data)
            store = DirectoryStore(directory)
            assert call("files.DirectoryStore.refresh", store.refresh) is True
            assert store.catalog.get("default", "harbor") is not None, store.catalog.errors
            assert all(isinstance(e, str) for e in store.catalog.errors)


def test_billion_laughs_is_cheap():
    # repr() or str() of a 9**9-leaf structure would never finish: no parser may format a value it did not check
    started = time.monotonic()
    docs = parse_manifests(billion_laughs())
    cat = model.build_catalog(("laughs.yaml", d) for d in docs)
    for d in docs:
        for parser in (lambda: model.parse_connector(d, {}), lambda: model.parse_secret(d)):
            try:
                parser()
            except ManifestError as e:
                assert len(str(e)) < 500
    assert time.monotonic() - started < 10
    assert len(cat) == 0


def test_yaml_errors_never_quote_the_file():
    # PyYAML's messages quote the offending line: here, the password line
    bad = f"apiVersion: v1\nkind: Secret\nstringData:\n  password: {SECRET_MARK}: [\n".encode()
    try:
        parse_manifests(bad)
    except ManifestError as e:
        assert SECRET_MARK not in str(e)
        assert "line 4" in str(e)
    else:
        raise AssertionError("invalid YAML was accepted")


def test_known_crashes_name_the_field():
    def error(doc, secrets=None):
        try:
            model.parse_connector(doc, secrets or {})
        except ManifestError as e:
            return str(e)
        raise AssertionError("no ManifestError")

    assert error(replaced(SEED_CONNECTOR, ("spec", "auth", "params"), 5)) == \
        "connector default/harbor: spec.auth.params: expected a list of {name, value}, got int"
    assert "spec.addressExtensions: expected a list of addresses, got bool" in \
        error(replaced(SEED_CONNECTOR, ("spec", "addressExtensions"), True))
    try:
        list(model.flatten([list_doc("List", 5)]))
    except ManifestError as e:
        assert "items: expected a list of manifests, got int" in str(e)
    else:
        raise AssertionError("no ManifestError")
    s = Secret("default", "s", model.SECRET_TYPE_DOCKERCONFIGJSON, {".dockerconfigjson": '{"auths":[1]}'})
    try:
        model.credentials_from_secret(s, ADDRESSES[0])
    except ManifestError as e:
        assert "auths: expected a JSON object, got list" in str(e)
    else:
        raise AssertionError("no ManifestError")


# ----------------------------------------------------------------------------- addons: client credentials

B64_ANY = st.builds(lambda raw: base64.b64encode(raw).decode(), st.binary(max_size=60))
USER_TOKEN = st.builds(
    lambda user, token: base64.b64encode(f"{user}:{token}".encode("utf-8", "surrogatepass")).decode(),
    st.one_of(ANY_TEXT, soup(["ns/name", "default/harbor", ",", "/", "%2C", "%", " ", "team-a/x"])),
    st.one_of(ANY_TEXT, st.sampled_from(["tok", "eyJhbGciOi.x.y", "a b", "\x7f", ""])),
)
AUTHORIZATION = st.one_of(
    st.none(),
    ANY_TEXT,
    BYTES_AS_TEXT,
    st.builds(lambda scheme, value: scheme + value,
              st.sampled_from(["Basic ", "basic ", "BASIC  ", " Basic\t", "Bearer ", "bearer  ", "Basic", "Negotiate "]),
              st.one_of(B64_ANY, USER_TOKEN, ANY_TEXT, BYTES_AS_TEXT, HUGE_DIGITS)),
)
ONE_MB = "Basic " + "A" * (1024 * 1024)


@given(batch(AUTHORIZATION))
@example(["\udcff", "Basic \udcff", "Bearer \udcff", "Bearer \x00", "Bearer ¹", "Basic ///=", ONE_MB, "Bearer " + "x" * 2**20])
@example(["Basic " + base64.b64encode("u:\udcff".encode("utf-8", "surrogatepass")).decode()])
@example(["Basic " + base64.b64encode(b"u:\xff\xfe").decode(), "Basic " + base64.b64encode(b"u:tok\r\n").decode()])
def test_parse_client_credential_never_raises(values):
    parse = addon("client_auth", "parse_client_credential")
    for value in values:
        token = call("client_auth.parse_client_credential", parse, value)
        assert token is None or (isinstance(token, str) and VISIBLE_ASCII.fullmatch(token)), repr(token)


@given(batch(AUTHORIZATION))
@example(["\udcff", "Basic \udcff", ONE_MB, "Basic " + base64.b64encode(b"default/harbor:tok").decode()])
@example(["Basic " + base64.b64encode(b"%ff%fe/x:tok").decode(), "Basic " + base64.b64encode(b"a/b,:tok").decode()])
@example(["Basic " + base64.b64encode("d\udcff/x:tok".encode("utf-8", "surrogatepass")).decode()])
def test_parse_proxy_authorization_never_raises(values):
    parse = addon("forward", "parse_proxy_authorization")
    for value in values:
        result = call("forward.parse_proxy_authorization", parse, value)
        if result is None:
            continue
        refs, token = result
        assert isinstance(refs, tuple) and refs
        assert all(isinstance(r, tuple) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in refs)
        assert isinstance(token, str) and VISIBLE_ASCII.fullmatch(token)


# ----------------------------------------------------------------------------- addons: upstream answers

CHALLENGE_TEXT = st.one_of(
    ANY_TEXT,
    BYTES_AS_TEXT,
    soup(['Bearer ', 'Basic ', 'bearer', ' ', ',', ', ', 'realm=', 'realm="https://auth.example.com/token"', '"', '\\',
          '\\"', 'service=', 'service="registry"', 'scope="repository:a:pull,push"', '=', 'error="insufficient_scope"',
          '\t', '\udcff', '\x00', 'a' * 50]),
)


@given(batch(CHALLENGE_TEXT))
@example(['Bearer realm="' + "\\" * 100_000, 'Bearer ' + "a=b," * 50_000, '"' * 100_000, "Bearer realm=" + "," * 100_000])
@example(["", "\udcff", 'Bearer realm="x\\', "=,=,=", "Bearer ,realm=x"])
def test_parse_www_authenticate_never_raises(values):
    parse = addon("oci", "parse_www_authenticate")
    for value in values:
        challenges = call("oci.parse_www_authenticate", parse, value)
        assert isinstance(challenges, list)
        for c in challenges:
            assert isinstance(c.scheme, str)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in c.params.items())


REALM_TEXT = st.one_of(
    ANY_TEXT,
    BYTES_AS_TEXT,
    soup(["https://", "http://", "HTTPS://", "ftp://", "//", "auth.example.com", "AUTH.example.com", "127.0.0.1",
          "[::1]", "[", "]", "[::ffff:127.0.0.1]", "[fe80::1%25eth0]", ":", ":443", ":0", ":65536", ":99999999999999999999",
          "@", "u:p@", "/", "/token", "?", "?service=x&scope=y", "#", "%", "%2f", "%zz", "%00", "\\", " ", "\t", "\n",
          "ｅ", "\udcff", "..", "-", ".", "a" * 64, "0x7f.1", "1.2.3.4.5", "localhost"]),
)


@given(batch(REALM_TEXT))
@example(["", "https://", "https://auth.example.com/token", "https://[::1", "https://a.example:99999999999999999999/",
          "https://\udcff/", "https://ｅxample.com/", "https://a.example/%zz", "http://u@a.example/", "https://a.example\\@b/",
          "https://[fe80::1%25eth0]/", "https://a.example:/x", "https://" + "a" * 100_000])
@example([None, 42])
def test_parse_realm_raises_only_realm_error(values):
    parse = addon("oci", "parse_realm")
    realm_error = addon("oci", "RealmError")
    assert issubclass(realm_error, ValueError)
    for value in values:
        try:
            realm = call("oci.parse_realm", parse, value)
        except realm_error as e:
            assert str(e)
            continue
        assert realm.scheme in ("http", "https")
        assert isinstance(realm.host, str) and realm.host and realm.host.isascii()
        assert isinstance(realm.port, int) and 0 < realm.port < 65536
        assert isinstance(realm.target, str) and realm.target.startswith("/")


TOKEN_BODY = st.one_of(
    st.binary(max_size=100),
    st.builds(lambda doc: json.dumps(doc).encode(), JSON_VALUES),
    st.builds(
        lambda doc: json.dumps(doc).encode("utf-8", "surrogatepass"),
        st.fixed_dictionaries({}, optional={
            "token": st.one_of(st.text(ANY_CHAR, max_size=20), JSON_VALUES, st.just("x" * 70_000)),
            "access_token": st.one_of(st.text(ANY_CHAR, max_size=20), JSON_VALUES),
            "expires_in": st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=5), JSON_VALUES,
                                    st.integers(min_value=2**1023, max_value=2**1100)),
            "issued_at": JSON_VALUES,
        }),
    ),
    st.builds(lambda digits: b'{"token":"t","expires_in":' + digits.encode() + b"}", HUGE_DIGITS),
    st.builds(lambda n: b"[" * n, st.integers(1, 100_000)),
)


@given(batch(TOKEN_BODY))
@example([b'{"token":"t","expires_in":1e999}', b'{"token":"t","expires_in":-1e999}', b'{"token":"t","expires_in":NaN}'])
@example([b'{"token":"t","expires_in":' + b"9" * 400 + b"}", b'{"token":"t","expires_in":' + b"9" * 5000 + b"}"])
@example([b"[" * 100_000, b"\xff", b'{"token":"\\ud800"}', b'{"token":"a\\nb"}', b'{"token":7}', b"null"])
def test_parse_token_response_raises_only_token_response_error(bodies):
    parse = addon("registry_client", "parse_token_response")
    token_error = addon("registry_client", "TokenResponseError")
    for body in bodies:
        try:
            token, expires_in = call("registry_client.parse_token_response", parse, body)
        except token_error as e:
            assert str(e)
            continue
        assert isinstance(token, str) and VISIBLE_ASCII.fullmatch(token)
        assert isinstance(expires_in, float) and math.isfinite(expires_in) and expires_in > 0


# ----------------------------------------------------------------------------- addons: client requests

API_PIECES = ["/", "a", "b", "library", "test/abc", "..", ".", "_", "__", "-", "A", "manifests", "blobs", "uploads",
              "tags", "list", "referrers", "_catalog", "latest", "v1.0", "sha256:" + "a" * 64, "sha256:", "%2f", "%2F",
              "\\", "\n", " ", "\udcff", "ｅ", "a" * 300, "?", "#", ":", "@"]
NAME_PIECES = ["default", "harbor", "team-a", "a", "-", ".", "..", "A", "\n", "\r", " ", "\t", "\x00", "%2f", "\udcff",
               "ǅ", "ı", "K", "a" * 63, "a" * 64, ""]
# A valid name with one odd character before or after it, or anything glued from the pieces.
NAME_SEGMENT = st.one_of(
    st.builds(lambda head, name, tail: head + name + tail, st.sampled_from(["", "", "", "\n", " ", "-", ".", "\udcff"]),
              st.sampled_from(["default", "harbor", "team-a", "a.b", "x" * 63]),
              st.sampled_from(["", "", "", "\n", "\r\n", " ", "\t", ".", "-", "\x00", "\udcff", "%0a"])),
    soup(NAME_PIECES, max_size=4),
)
API_PATH = st.one_of(
    ANY_TEXT,
    st.builds(lambda s: "/v2/" + s, soup(API_PIECES, max_size=16)),
    st.builds(lambda s: "/v2/namespaces/" + s, soup(["default", "/connectors/", "harbor", "/"] + API_PIECES, max_size=16)),
    st.builds(lambda ns, name, rest: f"/v2/namespaces/{ns}/connectors/{name}{rest}", NAME_SEGMENT, NAME_SEGMENT,
              st.one_of(st.sampled_from(["", "/", "/v2/", "/a/tags/list", "/a/manifests/latest", "/a/blobs/uploads/"]),
                        st.builds(lambda s: "/" + s, soup(API_PIECES, max_size=8)))),
    st.builds(lambda s: "/v2" + s, BYTES_AS_TEXT),
)
METHODS = st.one_of(st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "post", "ǅ", "ß"]), ANY_TEXT)
QUERIES = st.one_of(
    ANY_TEXT,
    BYTES_AS_TEXT,
    soup(["mount=", "from=", "sha256:" + "a" * 64, "namespaces/ns/connectors/name/", "namespaces/other/connectors/x/",
          "a/b", "&", "=", "%", "%ff", "%2F", "%ed%a0%80", "+", ";", "\udcff", "\x00"]),
)


@given(batch(API_PATH))
@example(["/v2/" + "a" * 100_000 + "/tags/list", "/v2/\udcff/tags/list", "/v2/a/manifests/" + "\udcff", "/v2"])
def test_parse_api_path_raises_only_protocol_error(paths):
    parse = addon("oci", "parse_api_path")
    protocol_error = addon("oci", "ProtocolError")
    for path in paths:
        try:
            api = call("oci.parse_api_path", parse, path)
        except protocol_error as e:
            assert isinstance(e.status, int) and 400 <= e.status < 500 and e.code
            continue
        assert api.kind in ("ping", "catalog", "manifest", "blob", "upload", "tags", "referrers")


@given(batch(st.tuples(API_PATH, METHODS, QUERIES)))
@example([("/v2/a/blobs/uploads/", "POST", "mount=sha256:x&from=\udcff"), ("/v2/a/blobs/uploads/", "ǅ", "")])
@example([("/v2/a/blobs/uploads/", "POST", "mount=x&from=" + "b/" * 50_000)])
def test_required_scopes_never_raises_for_a_parsed_path(cases):
    parse = addon("oci", "parse_api_path")
    protocol_error = addon("oci", "ProtocolError")
    scopes_of = addon("oci", "required_scopes")
    for path, method, query in cases:
        try:
            api = parse(path)
        except protocol_error:
            api = parse("/v2/library/a/blobs/uploads/")
        scopes = call("oci.required_scopes", scopes_of, method, api, query)
        assert isinstance(scopes, tuple) and all(isinstance(s, str) for s in scopes)


HEADER_BYTES = st.one_of(
    st.binary(max_size=30),
    ODD_NUMBERS.map(lambda s: s.encode("utf-8")),
    HUGE_DIGITS.map(str.encode),
    st.text(ANY_CHAR, max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"chunked", b"gzip, chunked", b"CHUNKED", b"identity", b"\xff"]),
)
HEADER_FIELDS = st.lists(
    st.tuples(st.sampled_from([b"content-length", b"Content-Length", b"transfer-encoding", b"Transfer-Encoding"]), HEADER_BYTES),
    max_size=3,
)


@given(batch(HEADER_FIELDS))
@example([[(b"content-length", "²".encode())], [(b"content-length", "١٢٣".encode())], [(b"content-length", b"9" * 5000)]])
@example([[(b"content-length", b"\xff")], [(b"transfer-encoding", b"\xff\xfe")], [(b"content-length", b"5"), (b"content-length", b"x")]])
def test_has_body_never_raises(cases):
    from mitmproxy import http

    has_body = addon("oci", "has_body")
    for fields in cases:
        request = http.Request.make("POST", "http://registry.example.com/v2/a/blobs/uploads/", b"", http.Headers(fields))
        assert isinstance(call("oci.has_body", has_body, request), bool)


HOSTS = st.one_of(
    st.none(),
    ANY_TEXT,
    BYTES_AS_TEXT,
    soup(["c-", "harbor", ".", "default", ".svc", ".cluster.local", ":80", ":", "99999", "\n", "\udcff", "C-", "HARBOR",
          "-", "a" * 70, "ｃ", "\x00"]),
)


@given(batch(HOSTS))
@example(["c-harbor.default\n", "c-harbor.default:\udcff", "C-ǅ.default", "c-" + "a" * 100_000 + ".default"])
def test_parse_host_form_never_raises(hosts):
    parse = addon("routing", "parse_host_form")
    for host in hosts:
        result = call("routing.parse_host_form", parse, host)
        assert result is None or (isinstance(result, tuple) and all(isinstance(x, str) for x in result))


@given(batch(st.tuples(API_PATH, HOSTS)))
@example([("/v2/namespaces/default\n/connectors/harbor/a/tags/list", None), ("/v2/a/tags/list", "c-harbor.default")])
@example([("/v2/namespaces/default/connectors/harbor/..%2f/tags/list", None), ("\udcff", "\udcff")])
def test_route_request_raises_only_protocol_error(cases):
    route_request = addon("routing", "route_request")
    protocol_error = addon("oci", "ProtocolError")
    for path, host in cases:
        try:
            route = call("routing.route_request", route_request, path, host, "http://proxy.example")
        except protocol_error as e:
            assert isinstance(e.status, int) and 400 <= e.status < 500 and e.code
            continue
        assert route.form in ("host", "path", "ping")


@given(batch(st.tuples(API_PATH, HOSTS)))
@example([("/v2/namespaces/default\n/connectors/harbor/a/tags/list", None)])
@example([("/v2/namespaces/default/connectors/harbor\n/a/tags/list", None)])
def test_route_request_names_only_kubernetes_names(cases):
    # Beyond "raises only ProtocolError": a route names a connector the store could hold, nothing else
    # (a newline in a namespace would reach lookups, logs and metrics labels).
    route_request = addon("routing", "route_request")
    protocol_error = addon("oci", "ProtocolError")
    for path, host in cases:
        try:
            route = call("routing.route_request (names)", route_request, path, host, "http://proxy.example")
        except protocol_error:
            continue
        if route.form in ("host", "path"):
            assert K8S_NAMESPACE.fullmatch(route.namespace) and K8S_NAME.fullmatch(route.name), route


def _route(form: str = "path"):
    route = addon("routing", "Route")
    if form == "path":
        return route("path", "ns", "name", "http://proxy", "namespaces/ns/connectors/name", "/v2/a/blobs/uploads/")
    return route("host", "ns", "name", "http://c-name.ns.svc:80", "", "/v2/a/blobs/uploads/")


@given(batch(st.tuples(QUERIES, st.sampled_from(["path", "host"]))))
@example([("mount=sha256:x&from=namespaces/ns/connectors/name/\udcff", "path"), ("from=%ff&mount=x", "path")])
@example([("from=namespaces/ns/connectors/name/a&from=%ed%a0%80", "path"), ("mount=%ff&from=namespaces/other/connectors/x/a", "path")])
def test_translate_mount_query_never_raises(cases):
    translate = addon("routing", "translate_mount_query")
    for query, form in cases:
        assert isinstance(call("routing.translate_mount_query", translate, query, _route(form)), str)


UPSTREAM = model.parse_address("https://registry.example.com")
REQUEST_URL = "https://registry.example.com/v2/a/blobs/uploads/"
URLS = st.one_of(
    ANY_TEXT,
    BYTES_AS_TEXT,
    soup(["https://", "http://", "//", "registry.example.com", "REGISTRY.example.com", "registry.example.com:443",
          "registry.example.com:99999", "other.example.com", "[::1]", "[", "]", ":", "@", "u:p@", "/v2/", "/v2",
          "a/blobs/uploads/", "uuid", "?", "_state=x", "&", "#", "%", "%2f", "..", "/", "\\", " ", "\n", "\udcff", "ｅ",
          "<", ">", ";", 'rel="next"', ","]),
)


@given(batch(st.tuples(URLS, st.sampled_from(["path", "host"]))))
@example([("http://[::1", "path"), ("https://registry.example.com:99999/v2/", "path"), ("//registry.example.com\udcff/v2/", "host")])
@example([("https://ｒegistry.example.com/v2/", "path"), ("https://registry.example.com/v2/a/blobs/uploads/\udcff", "path")])
def test_rewrite_url_never_raises(cases):
    rewrite_url = addon("rewrite", "rewrite_url")
    for url, form in cases:
        assert isinstance(call("rewrite.rewrite_url", rewrite_url, url, REQUEST_URL, UPSTREAM, _route(form)), str)


@given(batch(st.tuples(URLS, st.sampled_from(["path", "host"]))))
@example([("<http://[::1>; rel=\"next\"", "path"), ("</v2/a/tags/list?n=1&last=\udcff>; rel=\"next\"", "host")])
@example([("<" * 5_000, "path"), ("<https://registry.example.com:0/v2/>", "path")])
def test_rewrite_link_never_raises(cases):
    rewrite_link = addon("rewrite", "rewrite_link")
    for value, form in cases:
        assert isinstance(call("rewrite.rewrite_link", rewrite_link, value, REQUEST_URL, UPSTREAM, _route(form)), str)


def test_directory_store_reports_each_bad_file_once_and_loads_the_rest(tmp_path):
    (tmp_path / "a-good.yaml").write_text(SEED_TEXT)
    bad = {
        "b-utf8.yaml": b"kind: Connector\nmetadata: {name: \xc3\x28}\n",
        "c-alias.yaml": b"&a {kind: List, items: [*a]}\n",
        "d-items.yaml": b"apiVersion: v1\nkind: List\nitems: 5\n",
        "e-date.yaml": b"a: 2024-13-01\n",
        "f-float.yaml": b"a: !!float ''\n",
        "g-types.yaml": b"apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: typed}\n"
                        b"spec: {connectorClassName: oci, address: h.example, auth: {params: 5}}\n",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    store = DirectoryStore(tmp_path)
    assert store.refresh() is True
    assert store.catalog.get("default", "harbor").usable
    assert store.catalog.get("default", "typed") is None
    assert sorted(e.split(":")[0] for e in store.catalog.errors) == sorted(bad)
    assert any("spec.auth.params: expected a list of {name, value}, got int" in e for e in store.catalog.errors)
