"""Connectors and their credentials: parsed from Kubernetes-style manifests, validated, immutable.

Everything here is pure: the directory and Kubernetes backends feed manifests (dicts) in and get a
`Catalog` out. A Connector that cannot be used (missing Secret, Secret without a password, bad
address) is still in the catalog, with `problem` saying why, so its clients get a clear error while
every other connector keeps working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

CONNECTOR_API_GROUP = "connectors.alauda.io"
CONNECTOR_KIND = "Connector"
OCI_CLASS = "oci"
DEFAULT_NAMESPACE = "default"

SECRET_TYPE_REGISTRY_TOKEN = "cpaas.io/distribution-registry-token"
SECRET_TYPE_BASIC_AUTH = "kubernetes.io/basic-auth"
SECRET_TYPE_DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"

# Kubernetes object names: DNS-1123 subdomain for names, label for namespaces.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ManifestError(ValueError):
    """A manifest that cannot be understood at all (as opposed to a connector that is not usable)."""


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


HOST_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*\.?$")


def parse_address(url: str) -> Address:
    """Parse `spec.address`. A bare host (`harbor.example.com`) means https, as registry clients assume.

    Error messages never repeat the address: a mistyped one may hold credentials.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("address is empty")
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("address must not carry credentials; use spec.auth.secretRef")
    if parts.scheme not in ("http", "https"):
        raise ValueError("scheme must be http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("address has no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.match(host):
            raise ValueError(f"{host!r} is not a valid host name") from None
    if parts.query or parts.fragment:
        raise ValueError("address must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("address has an invalid port") from None
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v2"):  # people paste the API root; the proxy adds /v2 itself
        prefix = prefix[: -len("/v2")]
    return Address(
        scheme=parts.scheme,  # type: ignore[arg-type]
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
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
        h.update(b"\0" + v.encode())
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


def _metadata(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise ManifestError("metadata must be a mapping")
    name = meta.get("name")
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ManifestError(f"metadata.name {name!r} is not a valid Kubernetes name")
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise ManifestError(f"metadata.namespace {namespace!r} is not a valid namespace")
    return namespace, name


def parse_secret(doc: Mapping[str, Any]) -> Secret:
    """A v1 Secret: `stringData` (as people write it) wins over base64 `data` (as the API returns it)."""
    namespace, name = _metadata(doc)
    values: dict[str, str] = {}
    data = doc.get("data") or {}
    if not isinstance(data, Mapping):
        raise ManifestError(f"secret {namespace}/{name}: data must be a mapping")
    for k, v in data.items():
        try:
            values[str(k)] = base64.b64decode(str(v), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ManifestError(f"secret {namespace}/{name}: data.{k} is not valid base64 text") from None
    string_data = doc.get("stringData") or {}
    if not isinstance(string_data, Mapping):
        raise ManifestError(f"secret {namespace}/{name}: stringData must be a mapping")
    values.update({str(k): str(v) for k, v in string_data.items()})
    return Secret(namespace, name, str(doc.get("type") or "Opaque"), values)


def credentials_from_secret(secret: Secret, address: Address) -> Credentials:
    """Turn a Secret into upstream credentials; raises ValueError saying what is missing."""
    where = f"secret {secret.namespace}/{secret.name}"
    d = secret.data
    if secret.type == SECRET_TYPE_DOCKERCONFIGJSON:
        return _from_dockerconfig(where, d.get(".dockerconfigjson"), address)
    if secret.type in (SECRET_TYPE_REGISTRY_TOKEN, SECRET_TYPE_BASIC_AUTH) or "password" in d:
        username, password = d.get("username", ""), d.get("password")
        if not password:
            raise ValueError(f"{where} (type {secret.type}) has no 'password'")
        if not username and secret.type != SECRET_TYPE_BASIC_AUTH:
            raise ValueError(f"{where} (type {secret.type}) has no 'username'")
        return Credentials("basic", username, password, version=_fingerprint("basic", username, password))
    if d.get("token"):  # a static bearer token (e.g. a registry robot token used as is)
        return Credentials("bearer", token=d["token"], version=_fingerprint("bearer", d["token"]))
    raise ValueError(f"{where} (type {secret.type}) has neither 'password' nor 'token'")


def _from_dockerconfig(where: str, raw: str | None, address: Address) -> Credentials:
    if not raw:
        raise ValueError(f"{where} has no '.dockerconfigjson'")
    try:
        auths = json.loads(raw).get("auths") or {}
    except (ValueError, AttributeError):
        raise ValueError(f"{where}: .dockerconfigjson is not valid JSON") from None
    # docker writes keys as `host[:port]`, sometimes with a scheme or the legacy /v1/ path.
    wanted = {address.netloc, f"{address.host}:{address.port}"}
    for key, entry in auths.items():
        host = urlsplit(key if "://" in key else "//" + key).netloc.lower()
        if host in wanted and isinstance(entry, Mapping):
            username, password = entry.get("username", ""), entry.get("password", "")
            if entry.get("auth"):
                try:
                    username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    raise ValueError(f"{where}: auth for {key} is not valid base64") from None
            if entry.get("registrytoken") or entry.get("identitytoken"):
                token = entry.get("registrytoken") or entry.get("identitytoken")
                return Credentials("bearer", token=token, version=_fingerprint("bearer", token))
            if not password:
                raise ValueError(f"{where}: the entry for {key} has no password")
            return Credentials("basic", username, password, version=_fingerprint("basic", username, password))
    raise ValueError(f"{where}: .dockerconfigjson has no entry for {address.netloc}")


def _ca_from_secret(secret: Secret) -> str:
    pems = [v for k, v in sorted(secret.data.items()) if k == "ca.crt" or k.endswith((".crt", ".pem"))]
    if not pems or not all("-----BEGIN CERTIFICATE-----" in p for p in pems):
        raise ValueError(f"secret {secret.namespace}/{secret.name} holds no PEM certificate (ca.crt)")
    return "\n".join(pems)


def _ref_name(spec: Mapping[str, Any], *path: str) -> str | None:
    node: Any = spec
    for p in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(p)
    return node if isinstance(node, str) and node else None


def parse_connector(doc: Mapping[str, Any], secrets: Mapping[str, Secret]) -> Connector:
    """Build a Connector from its manifest; problems make it unusable rather than raising."""
    namespace, name = _metadata(doc)
    spec = doc.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ManifestError(f"connector {namespace}/{name}: spec must be a mapping")
    auth = spec.get("auth") or {}
    auth = auth if isinstance(auth, Mapping) else {}
    params = tuple(
        (str(p.get("name")), str(p.get("value", "")))
        for p in (auth.get("params") or [])
        if isinstance(p, Mapping) and p.get("name")
    )
    fields: dict[str, Any] = dict(
        namespace=namespace,
        name=name,
        class_name=str(spec.get("connectorClassName") or ""),
        raw_address=str(spec.get("address") or ""),
        address_extensions=tuple(str(a) for a in spec.get("addressExtensions") or [] if a),
        auth_name=str(auth.get("name") or ""),
        params=params,
        secret_name=_ref_name(auth, "secretRef", "name"),
        ca_secret_name=_ref_name(spec, "caCertSecretRef", "name"),
        address=None,
    )
    where = f"connector {namespace}/{name}"

    def unusable(reason: str, problem: str) -> Connector:
        return Connector(**fields, problem=problem, reason=reason)

    if fields["class_name"] != OCI_CLASS:
        return unusable("UnsupportedClass", f"{where} has connectorClassName {fields['class_name']!r}, not {OCI_CLASS!r}")
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


def is_connector(doc: Mapping[str, Any]) -> bool:
    return doc.get("kind") == CONNECTOR_KIND and str(doc.get("apiVersion", "")).startswith(CONNECTOR_API_GROUP + "/")


def is_secret(doc: Mapping[str, Any]) -> bool:
    return doc.get("kind") == "Secret" and doc.get("apiVersion", "v1") == "v1"


def flatten(docs: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    """Yield manifests, expanding `kind: List` (what `kubectl get -o yaml` writes)."""
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List") and "items" in doc:
            yield from flatten(doc.get("items") or [])
        else:
            yield doc


def build_catalog(docs: Iterable[tuple[str, Mapping[str, Any]]]) -> Catalog:
    """Build a Catalog from (source, manifest) pairs; source names where a manifest came from."""
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
