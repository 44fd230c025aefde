"""Connectors and their credentials: parsed from Kubernetes-style manifests, validated, immutable.

Everything here is pure: the directory and Kubernetes backends feed manifests (dicts) in and get a
`Catalog` out. A Connector that cannot be used (missing Secret, Secret without a password, bad
address) is still in the catalog, with `problem` saying why, so its clients get a clear error while
every other connector keeps working.

Manifests are untrusted input (anyone who can write the directory or create a Secret). Every parser
here raises `ManifestError` (a ValueError) and nothing else, whatever the document holds: wrong
types, recursive YAML aliases, lone surrogates from JSON escapes. Its message names the field path
(`spec.auth.params: expected a list of {name, value}, got int`) and never repeats a Secret's value.
tests/security/test_fuzz_parsers.py proves it with hypothesis; `scripts/fuzz` runs it at scale.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from connector_store.policy import POLICY_ANNOTATION, Policy, PolicyError, policy_from_annotations

CONNECTOR_API_GROUP = "connectors.alauda.io"
CONNECTOR_KIND = "Connector"
OCI_CLASS = "oci"
DEFAULT_NAMESPACE = "default"

SECRET_TYPE_REGISTRY_TOKEN = "cpaas.io/distribution-registry-token"
SECRET_TYPE_BASIC_AUTH = "kubernetes.io/basic-auth"
SECRET_TYPE_DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"

# Kubernetes object names: DNS-1123 subdomain for names, label for namespaces.
# `\Z`, not `$`: `$` also matches before a trailing newline, and "harbor\n" is no name.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
# What may go into an HTTP header as a token as is (RFC 6750 b64token, widened to visible ASCII).
_HEADER_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_PRINTABLE_ASCII_RE = re.compile(r"[\x21-\x7e]*")
MAX_LIST_DEPTH = 16  # `kind: List` inside `kind: List`...; a recursive YAML alias would never end


class ManifestError(ValueError):
    """A manifest that cannot be understood at all (as opposed to a connector that is not usable).

    The only exception the parsers in this module raise. Also raised by `credentials_from_secret`
    and `parse_address` for a Secret or address that cannot be used (there `parse_connector`
    turns it into the connector's `problem`).
    """


def _kind(value: Any) -> str:
    """The YAML/JSON type of a value, for messages (never the value itself: it may be a secret)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, (bytes, bytearray)):
        return "binary"
    return type(value).__name__


def _short(text: str, limit: int = 64) -> str:
    """repr() of a str for a message, cut to a readable length."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _text(value: str, path: str) -> str:
    """A str that can be encoded (JSON escapes such as "\\ud800" give lone surrogates, which can't)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ManifestError(f"{path}: not valid Unicode text (lone surrogate)") from None
    return value


def _string(value: Any, path: str, default: str = "") -> str:
    """A string field; absent or null gives `default`."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise ManifestError(f"{path}: expected a string, got {_kind(value)}")
    return _text(value, path)


def _mapping(value: Any, path: str) -> Mapping[Any, Any]:
    """A mapping field; absent or null gives {}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ManifestError(f"{path}: expected a mapping, got {_kind(value)}")
    return value


def _list(value: Any, path: str, what: str = "a list") -> list[Any]:
    """A list field; absent or null gives []."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ManifestError(f"{path}: expected {what}, got {_kind(value)}")
    return value


@dataclass(frozen=True)
class Address:
    """A registry address: `https://harbor.example.com[:port][/path/prefix]`."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    path_prefix: str = ""  # without trailing slash, e.g. "/artifactory/api/docker/repo"

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.default_port else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def __str__(self) -> str:
        return self.origin + self.path_prefix


HOST_RE = re.compile(r"^(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*\.?\Z")


def parse_address(url: str) -> Address:
    """Parse `spec.address`. A bare host (`harbor.example.com`) means https, as registry clients assume.

    Error messages never repeat the address: a mistyped one may hold credentials. Raises
    ManifestError (a ValueError) and nothing else, for any value.
    """
    if not isinstance(url, str) or not url.strip():
        raise ManifestError("address is empty")
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL", a netloc that changes under NFKC normalization
        raise ManifestError("address is not a valid URL") from None
    if "@" in parts.netloc:
        raise ManifestError("address must not carry credentials; use spec.auth.secretRef")
    if parts.scheme not in ("http", "https"):
        raise ManifestError("scheme must be http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise ManifestError("address has no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.match(host):
            raise ManifestError(f"{_short(host)} is not a valid host name") from None
    if parts.query or parts.fragment:
        raise ManifestError("address must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ManifestError("address has an invalid port") from None
    if port == 0:
        raise ManifestError("address has an invalid port (0)")
    if not _PRINTABLE_ASCII_RE.fullmatch(parts.path):
        raise ManifestError("address path must be printable ASCII without spaces (percent-encode the rest)")
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v2"):  # people paste the API root; the proxy adds /v2 itself
        prefix = prefix[: -len("/v2")]
    return Address(
        scheme=parts.scheme,  # type: ignore[arg-type]
        host=host,
        port=port if port is not None else (443 if parts.scheme == "https" else 80),
        path_prefix=prefix,
    )


@dataclass(frozen=True)
class Credentials:
    """What the proxy presents upstream. Secret values are kept out of repr()."""

    kind: Literal["anonymous", "basic", "bearer"]
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    # Changes whenever the secret material changes: part of every token cache key, so a rotated
    # Secret never reuses tokens fetched with the old one. A hash, never the secret itself.
    version: str = ""

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values that must never leave the proxy (for scrubbing and leak tests)."""
        return tuple(s for s in (self.password, self.token) if s)


ANONYMOUS = Credentials(kind="anonymous", version="anonymous")


def _fingerprint(*values: str) -> str:
    h = hashlib.sha256(b"connector-credentials")
    for v in values:
        h.update(b"\0" + v.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Secret:
    namespace: str
    name: str
    type: str
    data: Mapping[str, str] = field(repr=False)  # decoded values


@dataclass(frozen=True)
class Connector:
    namespace: str
    name: str
    class_name: str
    address: Address | None
    raw_address: str = field(default="", repr=False)  # may be mistyped with credentials
    address_extensions: tuple[str, ...] = ()  # other addresses of the same registry (forward mode)
    auth_name: str = ""
    params: tuple[tuple[str, str], ...] = ()
    secret_name: str | None = None
    ca_secret_name: str | None = None
    credentials: Credentials | None = None
    ca_pem: str | None = field(default=None, repr=False)
    problem: str | None = None  # why the connector is not usable; None when it is
    reason: str = ""  # the problem as a CamelCase condition reason (SecretNotFound, InvalidAddress, ...)
    policy: Policy | None = None  # repositories and actions it serves (connector_store/policy.py); None: all

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def usable(self) -> bool:
        return self.problem is None

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)


@dataclass(frozen=True)
class Catalog:
    """An immutable snapshot of every known connector, plus manifests that could not be read."""

    connectors: Mapping[str, Connector] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    def get(self, namespace: str, name: str) -> Connector | None:
        return self.connectors.get(f"{namespace}/{name}")

    def __len__(self) -> int:
        return len(self.connectors)


def _metadata(doc: Any) -> tuple[str, str]:
    if not isinstance(doc, Mapping):
        raise ManifestError(f"manifest: expected a mapping, got {_kind(doc)}")
    meta = _mapping(doc.get("metadata"), "metadata")
    name = meta.get("name")
    namespace = meta.get("namespace")
    if namespace is None or namespace == "":
        namespace = DEFAULT_NAMESPACE
    if not isinstance(name, str):
        raise ManifestError(f"metadata.name: expected a string, got {_kind(name)}")
    if not NAME_RE.match(name):
        raise ManifestError(f"metadata.name {_short(name)} is not a valid Kubernetes name")
    if not isinstance(namespace, str):
        raise ManifestError(f"metadata.namespace: expected a string, got {_kind(namespace)}")
    if not NAMESPACE_RE.match(namespace):
        raise ManifestError(f"metadata.namespace {_short(namespace)} is not a valid namespace")
    return namespace, name


def _secret_key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise ManifestError(f"{path}: keys must be strings, got {_kind(key)}")
    return _text(key, f"{path} key")


def parse_secret(doc: Mapping[str, Any]) -> Secret:
    """A v1 Secret: `stringData` (as people write it) wins over base64 `data` (as the API returns it).

    Values are strings, as Kubernetes requires (`password: 0123` is the number 83 in YAML: quote it).
    Raises ManifestError only.
    """
    namespace, name = _metadata(doc)
    where = f"secret {namespace}/{name}"
    values: dict[str, str] = {}
    data = _mapping(doc.get("data"), f"{where}: data")
    for k, v in data.items():
        key = _secret_key(k, f"{where}: data")
        if not isinstance(v, str):
            raise ManifestError(f"{where}: data.{_short(key)[1:-1]}: expected a base64 string, got {_kind(v)}")
        try:
            values[key] = base64.b64decode(v, validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text
            raise ManifestError(f"{where}: data.{_short(key)[1:-1]} is not valid base64 text") from None
    string_data = _mapping(doc.get("stringData"), f"{where}: stringData")
    for k, v in string_data.items():
        key = _secret_key(k, f"{where}: stringData")
        path = f"{where}: stringData.{_short(key)[1:-1]}"
        if not isinstance(v, str):
            raise ManifestError(f"{path}: expected a string, got {_kind(v)}")
        values[key] = _text(v, path)
    secret_type = _string(doc.get("type"), f"{where}: type") or "Opaque"
    return Secret(namespace, name, secret_type, values)


def credentials_from_secret(secret: Secret, address: Address) -> Credentials:
    """Turn a Secret into upstream credentials; raises ManifestError (a ValueError) saying what is wrong."""
    where = f"secret {secret.namespace}/{secret.name}"
    d = secret.data
    if secret.type == SECRET_TYPE_DOCKERCONFIGJSON:
        return _from_dockerconfig(where, d.get(".dockerconfigjson"), address)
    if secret.type in (SECRET_TYPE_REGISTRY_TOKEN, SECRET_TYPE_BASIC_AUTH) or "password" in d:
        username = _string(d.get("username"), f"{where}: username")
        password = _string(d.get("password"), f"{where}: password")
        if not password:
            raise ManifestError(f"{where} (type {_short(secret.type)[1:-1]}) has no 'password'")
        if not username and secret.type != SECRET_TYPE_BASIC_AUTH:
            raise ManifestError(f"{where} (type {_short(secret.type)[1:-1]}) has no 'username'")
        return Credentials("basic", username, password, version=_fingerprint("basic", username, password))
    token = _string(d.get("token"), f"{where}: token")
    if token:  # a static bearer token (e.g. a registry robot token used as is)
        return _bearer(f"{where}: token", token)
    raise ManifestError(f"{where} (type {_short(secret.type)[1:-1]}) has neither 'password' nor 'token'")


def _bearer(path: str, token: str) -> Credentials:
    # It goes into `Authorization: Bearer <token>` as is: a newline (kubectl create secret
    # --from-file keeps the file's last one) or a space would break or inject a header.
    if not _HEADER_TOKEN_RE.fullmatch(token):
        raise ManifestError(f"{path}: a bearer token must be visible ASCII without spaces or newlines")
    return Credentials("bearer", token=token, version=_fingerprint("bearer", token))


def _from_dockerconfig(where: str, raw: Any, address: Address) -> Credentials:
    if not raw:
        raise ManifestError(f"{where} has no '.dockerconfigjson'")
    if not isinstance(raw, str):
        raise ManifestError(f"{where}: .dockerconfigjson: expected a string, got {_kind(raw)}")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        raise ManifestError(f"{where}: .dockerconfigjson is not valid JSON") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{where}: .dockerconfigjson: expected a JSON object, got {_kind(config)}")
    auths = config.get("auths")
    if not auths:
        auths = {}
    if not isinstance(auths, dict):
        raise ManifestError(f"{where}: .dockerconfigjson auths: expected a JSON object, got {_kind(auths)}")
    # docker writes keys as `host[:port]`, sometimes with a scheme or the legacy /v1/ path.
    wanted = {address.netloc, f"{address.host}:{address.port}"}
    for key, entry in auths.items():
        try:
            host = urlsplit(key if "://" in key else "//" + key).netloc.lower()
        except ValueError:  # "[::1" and the like: not a registry address, so not ours
            continue
        if host not in wanted:
            continue
        path = f"{where}: .dockerconfigjson auths[{_short(key)}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: expected a JSON object, got {_kind(entry)}")
        fields = {f: _string(entry.get(f), f"{path}.{f}") for f in ("username", "password", "auth", "registrytoken", "identitytoken")}
        username, password = fields["username"], fields["password"]
        if fields["auth"]:
            try:
                username, _, password = base64.b64decode(fields["auth"]).decode().partition(":")
            except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
                raise ManifestError(f"{where}: auth for {_short(key)[1:-1]} is not valid base64") from None
        token = fields["registrytoken"] or fields["identitytoken"]
        if token:
            return _bearer(f"{path}.{'registrytoken' if fields['registrytoken'] else 'identitytoken'}", token)
        if not password:
            raise ManifestError(f"{where}: the entry for {_short(key)[1:-1]} has no password")
        return Credentials("basic", username, password, version=_fingerprint("basic", username, password))
    raise ManifestError(f"{where}: .dockerconfigjson has no entry for {address.netloc}")


def _ca_from_secret(secret: Secret) -> str:
    pems = [v for k, v in sorted(secret.data.items()) if k == "ca.crt" or k.endswith((".crt", ".pem"))]
    if not pems or not all("-----BEGIN CERTIFICATE-----" in p for p in pems):
        raise ManifestError(f"secret {secret.namespace}/{secret.name} holds no PEM certificate (ca.crt)")
    return "\n".join(pems)


def _ref_name(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    """`secretRef: {name: x}` -> "x"; None when absent or empty. Only a name a Secret can have: it
    ends up in problems, logs and error bodies."""
    ref = _mapping(parent.get(key), f"{path}.{key}")
    name = _string(ref.get("name"), f"{path}.{key}.name")
    if name and not NAME_RE.match(name):
        raise ManifestError(f"{path}.{key}.name {_short(name)} is not a valid Kubernetes name")
    return name or None


def _params(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """`[{name: repository, value: testing/busybox}]`; entries without a name are ignored, as before."""
    params = []
    for i, p in enumerate(_list(value, path, "a list of {name, value}")):
        if not isinstance(p, Mapping):
            raise ManifestError(f"{path}[{i}]: expected a mapping with name and value, got {_kind(p)}")
        name = _string(p.get("name"), f"{path}[{i}].name")
        if name:
            params.append((name, _string(p.get("value"), f"{path}[{i}].value")))
    return tuple(params)


def _address_extensions(value: Any, path: str) -> tuple[str, ...]:
    items = _list(value, path, "a list of addresses")
    strings = (_string(item, f"{path}[{i}]") for i, item in enumerate(items))
    return tuple(a for a in strings if a)  # empty entries are skipped, as before


def parse_connector(doc: Mapping[str, Any], secrets: Mapping[str, Secret]) -> Connector:
    """Build a Connector from its manifest; problems make it unusable rather than raising.

    Only a manifest that cannot be understood (bad metadata, a field of the wrong type) raises,
    and only ManifestError, naming the field: `spec.auth.params: expected a list of {name, value}, got int`.
    """
    namespace, name = _metadata(doc)
    where = f"connector {namespace}/{name}"
    spec = _mapping(doc.get("spec"), f"{where}: spec")
    auth = _mapping(spec.get("auth"), f"{where}: spec.auth")
    fields: dict[str, Any] = dict(
        namespace=namespace,
        name=name,
        class_name=_string(spec.get("connectorClassName"), f"{where}: spec.connectorClassName"),
        raw_address=_string(spec.get("address"), f"{where}: spec.address"),
        address_extensions=_address_extensions(spec.get("addressExtensions"), f"{where}: spec.addressExtensions"),
        auth_name=_string(auth.get("name"), f"{where}: spec.auth.name"),
        params=_params(auth.get("params"), f"{where}: spec.auth.params"),
        secret_name=_ref_name(auth, "secretRef", f"{where}: spec.auth"),
        ca_secret_name=_ref_name(spec, "caCertSecretRef", f"{where}: spec"),
        address=None,
    )

    def unusable(reason: str, problem: str) -> Connector:
        return Connector(**fields, problem=problem, reason=reason)

    try:
        fields["policy"] = policy_from_annotations((doc.get("metadata") or {}).get("annotations"))
    except PolicyError as e:
        return unusable("PolicyInvalid", f"{where}: annotation {POLICY_ANNOTATION}: {e}")
    if fields["class_name"] != OCI_CLASS:
        return unusable("UnsupportedClass", f"{where} has connectorClassName {_short(fields['class_name'])}, not {OCI_CLASS!r}")
    try:
        fields["address"] = parse_address(fields["raw_address"])
    except ValueError as e:
        return unusable("InvalidAddress", f"{where}: spec.address: {e}")
    if fields["ca_secret_name"]:
        ca_secret = secrets.get(f"{namespace}/{fields['ca_secret_name']}")
        if ca_secret is None:
            return unusable("CASecretNotFound", f"{where}: CA secret {namespace}/{fields['ca_secret_name']} not found")
        try:
            fields["ca_pem"] = _ca_from_secret(ca_secret)
        except ValueError as e:
            return unusable("CASecretInvalid", f"{where}: {e}")
    if not fields["secret_name"]:
        return Connector(**fields, credentials=ANONYMOUS)
    secret = secrets.get(f"{namespace}/{fields['secret_name']}")
    if secret is None:
        return unusable("SecretNotFound", f"{where}: secret {namespace}/{fields['secret_name']} not found")
    try:
        creds = credentials_from_secret(secret, fields["address"])
    except ValueError as e:
        return unusable("SecretInvalid", f"{where}: {e}")
    return Connector(**fields, credentials=creds)


def is_connector(doc: Any) -> bool:
    if not isinstance(doc, Mapping):
        return False
    api_version = doc.get("apiVersion")
    return (doc.get("kind") == CONNECTOR_KIND and isinstance(api_version, str)
            and api_version.startswith(CONNECTOR_API_GROUP + "/"))


def is_secret(doc: Any) -> bool:
    return isinstance(doc, Mapping) and doc.get("kind") == "Secret" and doc.get("apiVersion", "v1") == "v1"


def flatten(docs: Iterable[Any], _depth: int = 0) -> Iterable[Mapping[str, Any]]:
    """Yield manifests, expanding `kind: List` (what `kubectl get -o yaml` writes).

    Documents that are not mappings are skipped. A List whose `items` is not a list, or Lists
    nested deeper than MAX_LIST_DEPTH (a recursive YAML alias), raise ManifestError.
    """
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if kind == "List" or isinstance(kind, str) and kind.endswith("List") and "items" in doc:
            if _depth >= MAX_LIST_DEPTH:
                raise ManifestError(f"{_short(kind)[1:-1]}.items: Lists nested more than {MAX_LIST_DEPTH} deep")
            yield from flatten(_list(doc.get("items"), f"{_short(kind)[1:-1]}.items", "a list of manifests"), _depth + 1)
        else:
            yield doc


def build_catalog(docs: Iterable[tuple[str, Mapping[str, Any]]]) -> Catalog:
    """Build a Catalog from (source, manifest) pairs; source names where a manifest came from.

    Never raises for any manifest: what cannot be understood is reported in `errors`.
    """
    docs = list(docs)
    errors: list[str] = []
    secrets: dict[str, Secret] = {}
    for source, doc in docs:
        if is_secret(doc):
            try:
                s = parse_secret(doc)
                secrets[f"{s.namespace}/{s.name}"] = s
            except ManifestError as e:
                errors.append(f"{source}: {e}")
    connectors: dict[str, Connector] = {}
    for source, doc in docs:
        if is_connector(doc):
            try:
                c = parse_connector(doc, secrets)
            except ManifestError as e:
                errors.append(f"{source}: {e}")
                continue
            if c.key in connectors:
                errors.append(f"{source}: connector {c.key} is defined twice; keeping the first")
                continue
            connectors[c.key] = c
    return Catalog(connectors=connectors, errors=tuple(errors))
