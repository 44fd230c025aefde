"""Unit tests for connector_store/model.py and the directory backend (connector_store/files.py)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import yaml

from connector_store import model
from connector_store.files import DirectoryStore
from connector_store.model import ANONYMOUS, Address, Credentials, build_catalog, flatten, parse_address

# The seed document's Connector and Secret, exactly as shipped (and as written in the seed).
SEED = (Path(__file__).resolve().parent.parent / "manifests" / "examples" / "seed" / "harbor.yaml").read_text()


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def catalog_of(*docs):
    return build_catalog(("test.yaml", d) for d in flatten(docs))


def yaml_catalog(text: str):
    return catalog_of(*yaml.safe_load_all(text))


def connector(name="harbor", namespace=None, address="https://harbor.example.com", secret="harbor-secret",
              class_name="oci", **spec_extra):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    auth = {"name": "tokenAuth"}
    if secret:
        auth["secretRef"] = {"name": secret}
    spec = {"address": address, "auth": auth, "connectorClassName": class_name, **spec_extra}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector", "metadata": meta, "spec": spec}


def secret(name="harbor-secret", namespace=None, type="cpaas.io/distribution-registry-token", string_data=None, data=None):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": type}
    if string_data is not None:
        doc["stringData"] = string_data
    if data is not None:
        doc["data"] = data
    return doc


# ---------------------------------------------------------------- the seed


def test_seed_yaml_gives_a_usable_connector():
    cat = yaml_catalog(SEED)
    assert cat.errors == ()
    assert len(cat) == 1
    c = cat.get("default", "harbor")
    assert c is not None
    assert c.usable, c.problem
    assert c.problem is None
    assert c.key == "default/harbor"
    assert c.namespace == "default"
    assert c.class_name == "oci"
    assert c.auth_name == "tokenAuth"
    assert c.address == Address("https", "harbor.example.com", 443, "")
    assert str(c.address) == "https://harbor.example.com"
    assert c.credentials.kind == "basic"
    assert (c.credentials.username, c.credentials.password) == ("admin", "admin")
    assert c.param("repository") == "testing/busybox"
    assert c.param("missing") is None
    assert c.secret_name == "harbor-secret"


def test_seed_secret_with_base64_data_works_the_same():
    docs = list(yaml.safe_load_all(SEED))
    sec = docs[1]
    sec["data"] = {k: b64(v) for k, v in sec.pop("stringData").items()}
    c = catalog_of(*docs).get("default", "harbor")
    assert c.usable, c.problem
    assert c.credentials == yaml_catalog(SEED).get("default", "harbor").credentials


def test_string_data_wins_over_data():
    c = catalog_of(
        connector(),
        secret(data={"username": b64("u"), "password": b64("old")}, string_data={"password": "new"}),
    ).get("default", "harbor")
    assert (c.credentials.username, c.credentials.password) == ("u", "new")


def test_explicit_namespace():
    c = catalog_of(connector(namespace="team-a"), secret(namespace="team-a", string_data={"username": "u", "password": "p"}))
    assert c.get("team-a", "harbor").usable
    assert c.get("default", "harbor") is None


def test_secret_is_looked_up_in_the_connectors_namespace():
    cat = catalog_of(connector(namespace="team-a"), secret(string_data={"username": "u", "password": "p"}))
    c = cat.get("team-a", "harbor")
    assert c is not None and not c.usable
    assert "team-a/harbor-secret" in c.problem and "not found" in c.problem


# ---------------------------------------------------------------- unusable connectors


GOOD = [connector(name="good", secret="good-secret"), secret(name="good-secret", string_data={"username": "u", "password": "p"})]


def assert_unusable_but_others_fine(cat, name: str, *words: str):
    c = cat.get("default", name)
    assert c is not None, f"connector {name} must stay in the catalog"
    assert not c.usable
    assert c.problem
    for w in words:
        assert w in c.problem, (w, c.problem)
    good = cat.get("default", "good")
    assert good is not None and good.usable, good.problem


def test_missing_secret():
    cat = catalog_of(connector(), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "harbor-secret", "not found")


def test_secret_without_password():
    cat = catalog_of(connector(), secret(string_data={"username": "admin"}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "password")


def test_secret_with_empty_password():
    cat = catalog_of(connector(), secret(string_data={"username": "admin", "password": ""}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "password")


def test_registry_token_secret_without_username():
    cat = catalog_of(connector(), secret(string_data={"password": "p"}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "username")


@pytest.mark.parametrize("address", ["not a url", "http://", "ftp://harbor.example.com", "https://harbor.example.com:port",
                                     "", "https://h?x=1", "https://exa mple.com", "https://harbor!.example.com"])
def test_address_not_a_url(address):
    cat = catalog_of(connector(address=address), secret(string_data={"username": "u", "password": "p"}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "address")


@pytest.mark.parametrize("address", [
    "ftp://admin:s3cr3t-pw@harbor.example.com",  # bad scheme
    "https://admin:s3cr3t-pw@",  # no host
    "https://admin:s3cr3t-pw@harbor.example.com:notaport",
    "https://admin:s3cr3t-pw@harbor.example.com/?q=1",
])
def test_address_error_never_echoes_credentials(address):
    # the problem ends up in 503 bodies and logs (DESIGN sections 7 and 8)
    cat = catalog_of(connector(address=address), secret(string_data={"username": "u", "password": "p"}))
    c = cat.get("default", "harbor")
    assert not c.usable
    assert "s3cr3t-pw" not in c.problem, c.problem


@pytest.mark.parametrize("class_name", ["git", "", "OCI", "maven"])
def test_connector_class_not_oci(class_name):
    cat = catalog_of(connector(class_name=class_name), secret(string_data={"username": "u", "password": "p"}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "connectorClassName")


def test_missing_ca_secret():
    cat = catalog_of(connector(caCertSecretRef={"name": "harbor-ca"}),
                     secret(string_data={"username": "u", "password": "p"}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "harbor-ca")


def test_ca_secret_with_pem():
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    cat = catalog_of(connector(caCertSecretRef={"name": "harbor-ca"}),
                     secret(string_data={"username": "u", "password": "p"}),
                     secret(name="harbor-ca", type="Opaque", string_data={"ca.crt": pem}))
    c = cat.get("default", "harbor")
    assert c.usable, c.problem
    assert c.ca_pem == pem


def test_invalid_base64_in_secret_is_a_catalog_error_not_a_crash():
    cat = catalog_of(connector(), secret(data={"username": "!!!", "password": b64("p")}), *GOOD)
    assert any("harbor-secret" in e for e in cat.errors)
    assert_unusable_but_others_fine(cat, "harbor", "not found")


def test_invalid_metadata_name_is_a_catalog_error():
    bad = connector(name="Bad_Name")
    cat = catalog_of(bad, *GOOD)
    assert cat.get("default", "Bad_Name") is None
    assert any("Bad_Name" in e for e in cat.errors)
    assert cat.get("default", "good").usable


def test_duplicate_connector_keeps_the_first():
    first = connector(address="https://first.example.com")
    second = connector(address="https://second.example.com")
    cat = catalog_of(first, second, secret(string_data={"username": "u", "password": "p"}))
    assert cat.get("default", "harbor").address.host == "first.example.com"
    assert any("twice" in e for e in cat.errors)


# ---------------------------------------------------------------- other Secret types


def test_basic_auth_secret():
    c = catalog_of(connector(), secret(type="kubernetes.io/basic-auth", data={"username": b64("robot"), "password": b64("pw")}))
    cred = c.get("default", "harbor").credentials
    assert (cred.kind, cred.username, cred.password) == ("basic", "robot", "pw")


def dockerconfig(auths: dict) -> dict:
    return secret(type="kubernetes.io/dockerconfigjson", data={".dockerconfigjson": b64(json.dumps({"auths": auths}))})


def test_dockerconfigjson_auth_form():
    cat = catalog_of(connector(), dockerconfig({
        "other.example.com": {"auth": b64("x:y")},
        "harbor.example.com": {"auth": b64("robot$ci:tok:with:colons")},
    }))
    c = cat.get("default", "harbor")
    assert c.usable, c.problem
    assert (c.credentials.kind, c.credentials.username, c.credentials.password) == ("basic", "robot$ci", "tok:with:colons")


def test_dockerconfigjson_username_password_form():
    cat = catalog_of(connector(), dockerconfig({"harbor.example.com": {"username": "u", "password": "p"}}))
    c = cat.get("default", "harbor")
    assert (c.credentials.username, c.credentials.password) == ("u", "p")


def test_dockerconfigjson_key_with_scheme_and_port():
    cat = catalog_of(connector(address="https://harbor.example.com:5000"),
                     dockerconfig({"https://harbor.example.com:5000/v1/": {"username": "u", "password": "p"}}))
    c = cat.get("default", "harbor")
    assert c.usable, c.problem
    assert c.credentials.password == "p"


def test_dockerconfigjson_string_data():
    doc = secret(type="kubernetes.io/dockerconfigjson",
                 string_data={".dockerconfigjson": json.dumps({"auths": {"harbor.example.com": {"auth": b64("a:b")}}})})
    c = catalog_of(connector(), doc).get("default", "harbor")
    assert (c.credentials.username, c.credentials.password) == ("a", "b")


def test_dockerconfigjson_missing_entry():
    cat = catalog_of(connector(), dockerconfig({"other.example.com": {"auth": b64("x:y")}}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "harbor.example.com")


def test_dockerconfigjson_port_must_match():
    cat = catalog_of(connector(), dockerconfig({"harbor.example.com:5000": {"auth": b64("x:y")}}), *GOOD)
    assert_unusable_but_others_fine(cat, "harbor")


def test_dockerconfigjson_not_json():
    doc = secret(type="kubernetes.io/dockerconfigjson", string_data={".dockerconfigjson": "{not json"})
    cat = catalog_of(connector(), doc, *GOOD)
    assert_unusable_but_others_fine(cat, "harbor", "JSON")


def test_static_bearer_token_secret():
    c = catalog_of(connector(), secret(type="Opaque", string_data={"token": "robot-token"})).get("default", "harbor")
    assert c.usable
    assert (c.credentials.kind, c.credentials.token) == ("bearer", "robot-token")
    assert "robot-token" not in repr(c)


def test_no_secret_ref_means_anonymous():
    c = catalog_of(connector(secret=None)).get("default", "harbor")
    assert c.usable
    assert c.credentials == ANONYMOUS
    assert c.credentials.kind == "anonymous"
    assert c.credentials.secrets == ()


# ---------------------------------------------------------------- List flattening


def test_kind_list_is_flattened():
    docs = list(yaml.safe_load_all(SEED))
    lst = {"apiVersion": "v1", "kind": "List", "items": docs}
    cat = catalog_of(lst)
    assert cat.get("default", "harbor").usable


def test_typed_lists_and_nesting():
    docs = list(yaml.safe_load_all(SEED))
    lst = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorList", "items": [docs[0]]},
        {"apiVersion": "v1", "kind": "SecretList", "items": [docs[1]]},
        None, "junk",
    ]}
    flat = list(flatten([lst, None, 42]))
    assert [d["kind"] for d in flat] == ["Connector", "Secret"]
    assert catalog_of(lst).get("default", "harbor").usable


def test_non_connector_documents_are_ignored():
    docs = list(yaml.safe_load_all(SEED)) + [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
        {"apiVersion": "other.io/v1", "kind": "Connector", "metadata": {"name": "y"}, "spec": {}},
    ]
    cat = catalog_of(*docs)
    assert list(cat.connectors) == ["default/harbor"]


# ---------------------------------------------------------------- parse_address


@pytest.mark.parametrize(
    "url, expected",
    [
        ("harbor.example.com", Address("https", "harbor.example.com", 443, "")),
        ("harbor.example.com:5000", Address("https", "harbor.example.com", 5000, "")),
        ("http://harbor.example.com", Address("http", "harbor.example.com", 80, "")),
        ("http://127.0.0.1:5000", Address("http", "127.0.0.1", 5000, "")),
        ("https://HARBOR.Example.com/", Address("https", "harbor.example.com", 443, "")),
        ("https://harbor.example.com/v2", Address("https", "harbor.example.com", 443, "")),
        ("https://harbor.example.com/v2/", Address("https", "harbor.example.com", 443, "")),
        ("https://art.example.com/artifactory/api/docker/repo",
         Address("https", "art.example.com", 443, "/artifactory/api/docker/repo")),
        ("https://art.example.com/artifactory/api/docker/repo/v2/",
         Address("https", "art.example.com", 443, "/artifactory/api/docker/repo")),
        ("  https://harbor.example.com  ", Address("https", "harbor.example.com", 443, "")),
        ("http://[::1]:5000", Address("http", "::1", 5000, "")),
    ],
)
def test_parse_address_variants(url, expected):
    assert parse_address(url) == expected


def test_address_netloc_and_origin():
    assert parse_address("https://h.example:443").netloc == "h.example"
    assert parse_address("https://h.example:8443").origin == "https://h.example:8443"
    assert parse_address("http://[::1]:5000").netloc == "[::1]:5000"
    assert str(parse_address("https://a.example/p/v2")) == "https://a.example/p"


@pytest.mark.parametrize("url", ["https://admin:admin@harbor.example.com", "https://admin@harbor.example.com",
                                 "harbor.example.com@evil.com", "http://u:p@127.0.0.1:5000"])
def test_parse_address_rejects_credentials(url):
    with pytest.raises(ValueError) as e:
        parse_address(url)
    assert "credentials" in str(e.value)


@pytest.mark.parametrize("url", ["", "   ", None, 42, "ftp://h", "https://", "https://h:99999", "https://h#frag",
                                 "https://h?x=1", "not a url", "https://bad host.example"])
def test_parse_address_rejects_garbage(url):
    with pytest.raises(ValueError):
        parse_address(url)


# ---------------------------------------------------------------- Credentials


def test_credentials_repr_never_contains_secrets():
    c = yaml_catalog(SEED.replace("password: admin", "password: Sup3r-Secret-pw")).get("default", "harbor")
    assert c.credentials.password == "Sup3r-Secret-pw"
    for text in (repr(c.credentials), str(c.credentials), repr(c)):
        assert "Sup3r-Secret-pw" not in text
    bearer = Credentials("bearer", token="tok-123456", version="v")
    assert "tok-123456" not in repr(bearer)
    assert bearer.secrets == ("tok-123456",)
    assert c.credentials.secrets == ("Sup3r-Secret-pw",)


def test_secret_repr_hides_data():
    s = model.parse_secret(secret(string_data={"username": "u", "password": "Sup3r-Secret-pw"}))
    assert "Sup3r-Secret-pw" not in repr(s)


def test_credential_version_changes_with_the_password_and_not_otherwise():
    v1 = yaml_catalog(SEED).get("default", "harbor").credentials.version
    v1_again = yaml_catalog(SEED).get("default", "harbor").credentials.version
    v2 = yaml_catalog(SEED.replace("password: admin", "password: admin2")).get("default", "harbor").credentials.version
    v3 = yaml_catalog(SEED.replace("username: admin", "username: root")).get("default", "harbor").credentials.version
    assert v1 and v1 == v1_again
    assert v2 != v1
    assert v3 != v1
    assert "admin" not in v1 and "admin2" not in v2


def test_credential_version_distinguishes_field_boundaries():
    a = model.credentials_from_secret(model.parse_secret(secret(string_data={"username": "ab", "password": "c"})),
                                      parse_address("h.example"))
    b = model.credentials_from_secret(model.parse_secret(secret(string_data={"username": "a", "password": "bc"})),
                                      parse_address("h.example"))
    assert a.version != b.version


def test_connector_is_immutable():
    c = yaml_catalog(SEED).get("default", "harbor")
    with pytest.raises(AttributeError):
        c.problem = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- DirectoryStore


def write(path: Path, text: str, mtime_ns: int | None = None) -> None:
    path.write_text(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_directory_store_loads_and_detects_changes(tmp_path):
    store = DirectoryStore(tmp_path)
    assert store.synced is False
    assert store.refresh() is True  # first load, even of an empty directory
    assert store.synced is True
    assert len(store.catalog) == 0
    assert store.refresh() is False

    write(tmp_path / "harbor.yaml", SEED, 1_000_000_000_000_000_000)
    assert store.refresh() is True
    c = store.catalog.get("default", "harbor")
    assert c is not None and c.usable and c.credentials.password == "admin"
    assert store.refresh() is False

    # same size, different content, newer mtime: a password rotation
    write(tmp_path / "harbor.yaml", SEED.replace("password: admin", "password: nimda"), 1_000_000_001_000_000_000)
    assert store.refresh() is True
    assert store.catalog.get("default", "harbor").credentials.password == "nimda"
    assert store.refresh() is False

    (tmp_path / "harbor.yaml").unlink()
    assert store.refresh() is True
    assert store.catalog.get("default", "harbor") is None
    assert store.refresh() is False


def test_directory_store_add_file(tmp_path):
    write(tmp_path / "harbor.yaml", SEED)
    store = DirectoryStore(tmp_path)
    assert store.refresh() is True
    assert len(store.catalog) == 1
    extra = SEED.replace("name: harbor\n", "name: quay\n").replace("harbor-secret", "quay-secret")
    write(tmp_path / "quay.yml", extra)
    assert store.refresh() is True
    assert sorted(store.catalog.connectors) == ["default/harbor", "default/quay"]


def test_directory_store_multi_document_and_split_files(tmp_path):
    connector_doc, secret_doc = SEED.split("---\n")
    write(tmp_path / "a-connector.yaml", connector_doc)
    write(tmp_path / "b-secret.yaml", secret_doc)
    write(tmp_path / "all.yaml", SEED.replace("name: harbor\n", "name: second\n").replace("harbor-secret", "s2"))
    store = DirectoryStore(tmp_path)
    store.refresh()
    assert store.catalog.errors == ()
    assert store.catalog.get("default", "harbor").usable
    assert store.catalog.get("default", "second").usable


def test_directory_store_ignores_other_files(tmp_path):
    write(tmp_path / "README.md", "not yaml: [")
    write(tmp_path / ".hidden.yaml", SEED)
    store = DirectoryStore(tmp_path)
    store.refresh()
    assert len(store.catalog) == 0
    assert store.catalog.errors == ()


def test_directory_store_broken_yaml_reported_others_load(tmp_path):
    write(tmp_path / "good.yaml", SEED)
    write(tmp_path / "broken.yaml", "apiVersion: v1\nkind: [unclosed\n  : : :\n")
    store = DirectoryStore(tmp_path)
    assert store.refresh() is True
    assert store.catalog.get("default", "harbor").usable
    assert len(store.catalog.errors) == 1
    assert "broken.yaml" in store.catalog.errors[0]


def test_directory_store_fixing_broken_file(tmp_path):
    write(tmp_path / "x.yaml", "kind: [", 1_000_000_000_000_000_000)
    store = DirectoryStore(tmp_path)
    store.refresh()
    assert store.catalog.errors and len(store.catalog) == 0
    write(tmp_path / "x.yaml", SEED, 1_000_000_002_000_000_000)
    assert store.refresh() is True
    assert store.catalog.errors == ()
    assert store.catalog.get("default", "harbor").usable


def test_directory_store_follows_symlinks_like_a_configmap_volume(tmp_path):
    data = tmp_path / "..data"
    data.mkdir()
    write(data / "harbor.yaml", SEED)
    (tmp_path / "harbor.yaml").symlink_to(data / "harbor.yaml")
    store = DirectoryStore(tmp_path)
    store.refresh()
    assert store.catalog.get("default", "harbor").usable
