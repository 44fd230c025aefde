"""Client configuration files: what the reference system's connectors CSI driver mounts (DESIGN section 6).

Everything here is a pure function of a `RenderRequest` except `write_files`, the one helper that
touches the disk. The renderer only reads a connector's namespace, name and class: it never looks
at `connector.credentials` (nor the address), so no registry password or upstream token can end up
in a rendered file. The only secret in the output is the workload's own token.

Configuration names (`configuration.names`, comma-separated, whitespace tolerated, duplicates harmless):

- `registry-config` (legacy alias `docker-config`): `config.json`, docker's auth file with one entry
  per distinct proxy host, `auth` = base64("connector-proxy:<token>"). The user name is fixed and
  not secret; the proxy ignores it (DESIGN section 3).
- `buildkitd`: `buildkitd.toml`, one `[registry."<host>"]` table with `http = true` per distinct
  plain-HTTP proxy host (an https proxy URL needs no table: buildkit's default is https).
- Built-in files, rendered with every configuration (as in the reference system) whenever their
  input is available, and silently left out when it is not:
  `context.token` (the token, no trailing newline, like a projected ServiceAccount token),
  `connector.status.proxyAddress` (the proxy address, one line per connector, no trailing newline),
  `http.proxy`, `https.proxy` and `.env` (need the forward proxy address), `ca.crt` (needs the CA).
  Naming a built-in file explicitly makes it required: without its input, rendering fails and says
  which input is missing.
- An empty string means the built-in files only (the reference system's default).
- `!<file>` removes that file after everything is merged (`!ca.crt`, `!.env`). Unknown names and
  exclusions of files that can never be rendered are errors that list the valid spellings.

Proxy addresses: with a proxy URL (`--proxy-url`, e.g. a NodePort `http://192.168.1.5:31567`) the
path form `<proxy-url>/namespaces/<ns>/connectors/<name>`, whose registry host is the URL's
host[:port]; without one, the in-cluster host form `http://c-<name>.<ns>.svc.cluster.local`, with the
same path prefix (the address the Connector's status advertises; it routes in both forms).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote, urlsplit

from connector_store.addresses import DEFAULT_CLUSTER_DOMAIN, host_form_host
from connector_store.model import OCI_CLASS, Connector

AUTH_USER = "connector-proxy"  # the user half of config.json's auth; never checked by the proxy

REGISTRY_CONFIG = "registry-config"
DOCKER_CONFIG = "docker-config"  # the reference system's name, kept as an alias
BUILDKITD = "buildkitd"

CONFIG_JSON = "config.json"
BUILDKITD_TOML = "buildkitd.toml"
DOT_ENV = ".env"
HTTP_PROXY_FILE = "http.proxy"
HTTPS_PROXY_FILE = "https.proxy"
CONTEXT_TOKEN = "context.token"
PROXY_ADDRESS_FILE = "connector.status.proxyAddress"
CA_CRT = "ca.crt"

ALIASES: Mapping[str, str] = MappingProxyType({DOCKER_CONFIG: REGISTRY_CONFIG})
CONFIGURATION_FILES: Mapping[str, str] = MappingProxyType({REGISTRY_CONFIG: CONFIG_JSON, BUILDKITD: BUILDKITD_TOML})
BUILTIN_FILES: tuple[str, ...] = (DOT_ENV, HTTP_PROXY_FILE, HTTPS_PROXY_FILE, CONTEXT_TOKEN, PROXY_ADDRESS_FILE, CA_CRT)
VALID_NAMES: tuple[str, ...] = (REGISTRY_CONFIG, DOCKER_CONFIG, BUILDKITD, *BUILTIN_FILES)
RENDERABLE_FILES: tuple[str, ...] = (CONFIG_JSON, BUILDKITD_TOML, *BUILTIN_FILES)

NO_PROXY_BASE: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")



class RenderError(ValueError):
    """The request cannot be rendered; the message says which input is wrong or missing (never the token)."""


@dataclass(frozen=True)
class RenderRequest:
    """Everything a rendering depends on. Connectors are used in the order given (duplicates ignored).

    `token`: the workload's token (surrounding whitespace, e.g. a file's trailing newline, is dropped).
    `proxy_url`: the reverse proxy's base URL (`http://host[:port]`); None means the in-cluster host form.
    `forward_proxy`: the forward listener, `host:port` or `http://host:port`; None: no proxy env files.
    `ca_pem`: the forward proxy's CA certificate (PEM); None: no `ca.crt`.
    `names`: the `configuration.names` string.
    `cluster_domain`: the cluster's DNS domain, for host-form names.
    """

    connectors: Sequence[Connector]
    token: str = field(repr=False)
    names: str = ""
    proxy_url: str | None = None
    forward_proxy: str | None = None
    ca_pem: str | None = field(default=None, repr=False)
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "connectors", tuple(self.connectors))


# -- configuration.names ------------------------------------------------------------------------


def parse_names(spec: str | None) -> tuple[tuple[str, ...], frozenset[str]]:
    """Parse `configuration.names` into (names, excluded file names).

    Names come back in first-seen order, deduplicated, aliases replaced by their canonical name
    (`docker-config` -> `registry-config`). Raises RenderError listing every unknown name or exclusion.
    """
    names: list[str] = []
    excluded: set[str] = set()
    unknown: list[str] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("!"):
            file = item[1:].strip()
            if file in RENDERABLE_FILES:
                excluded.add(file)
            else:
                unknown.append(item)
            continue
        if item not in VALID_NAMES:
            unknown.append(item)
            continue
        canonical = ALIASES.get(item, item)
        if canonical not in names:
            names.append(canonical)
    if unknown:
        raise RenderError(
            f"unknown configuration names: {', '.join(repr(u) for u in dict.fromkeys(unknown))}; "
            f"valid names: {', '.join(VALID_NAMES)}; "
            f"'!<file>' excludes one of: {', '.join(RENDERABLE_FILES)}"
        )
    return tuple(names), frozenset(excluded)


# -- addresses ----------------------------------------------------------------------------------


def _proxy_origin(proxy_url: str) -> tuple[str, str]:
    """Validate a proxy base URL; returns (scheme, host[:port]) with the host lower-cased.

    Registry clients always talk to `/v2/` at the root of a host, so a proxy URL with a path
    (`https://gw/registry`) could never work and is refused, as are credentials, query and fragment.
    """
    parts = urlsplit(proxy_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RenderError(f"proxy URL {proxy_url!r} must look like http://host[:port] or https://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise RenderError("proxy URL must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise RenderError(
            f"proxy URL {proxy_url!r} must not have a path, query or fragment: "
            "registry clients need /v2/ at the root of the host"
        )
    try:
        parts.port
    except ValueError:
        raise RenderError(f"proxy URL {proxy_url!r} has an invalid port") from None
    return parts.scheme, parts.netloc.lower()


def _host_form_host(connector: Connector, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """`c-<name>.<ns>.svc.<cluster domain>`; refused when `c-<name>` is no single DNS label (dots, length)."""
    host = host_form_host(connector.name, connector.namespace, cluster_domain)
    if host is None:
        raise RenderError(
            f"connector {connector.key} cannot be addressed in host form ('c-{connector.name}' is not a DNS label); "
            "give a proxy URL to use the path form"
        )
    return host


def registry_host(connector: Connector, proxy_url: str | None = None, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """The registry host[:port] clients use for this connector: the key of config.json and buildkitd.toml."""
    return _proxy_origin(proxy_url)[1] if proxy_url else _host_form_host(connector, cluster_domain)


def proxy_address(connector: Connector, proxy_url: str | None = None, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """The connector's proxy address, as its status advertises it: the path-form prefix on
    `proxy_url`, else on the in-cluster host-form host (where it works in both forms)."""
    path = f"/namespaces/{connector.namespace}/connectors/{connector.name}"
    if not proxy_url:
        return f"http://{_host_form_host(connector, cluster_domain)}{path}"
    scheme, netloc = _proxy_origin(proxy_url)
    return f"{scheme}://{netloc}{path}"


def _distinct(values: Iterable[str]) -> tuple[str, ...]:
    """Values in first-seen order, without repeats."""
    return tuple(dict.fromkeys(values))


def _http_hosts(connectors: Sequence[Connector], proxy_url: str | None,
                cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> tuple[str, ...]:
    """The distinct proxy hosts that speak plain HTTP (every host-form host; a proxy URL only if http)."""
    if proxy_url and _proxy_origin(proxy_url)[0] != "http":
        return ()
    return _distinct(registry_host(c, proxy_url, cluster_domain) for c in connectors)


def _hostname(netloc: str) -> str:
    """`host:port` or `[v6]:port` -> host, as no_proxy lists want it."""
    return urlsplit("//" + netloc).hostname or netloc


def forward_proxy_url(connectors: Sequence[Connector], token: str, forward_proxy: str) -> str:
    """`http://<ns>%2F<name>[,<ns2>%2F<name2>]:<token>@host:port`, the forward proxy with its credentials.

    Clients percent-decode the user info, so the proxy receives `<ns>/<name>,...:<token>` in
    `Proxy-Authorization` (DESIGN section 3). The token is percent-encoded too, for tokens that are
    not JWTs; a JWT passes unchanged.
    """
    base = forward_proxy.strip()
    parts = urlsplit(base if "://" in base else "http://" + base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RenderError(f"forward proxy {forward_proxy!r} must look like host:port or http://host:port")
    if parts.username is not None or parts.password is not None:
        raise RenderError("forward proxy address must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise RenderError(f"forward proxy {forward_proxy!r} must not have a path, query or fragment")
    try:
        parts.port
    except ValueError:
        raise RenderError(f"forward proxy {forward_proxy!r} has an invalid port") from None
    user = ",".join(f"{quote(c.namespace, safe='')}%2F{quote(c.name, safe='')}" for c in connectors)
    return f"{parts.scheme}://{user}:{quote(token, safe='')}@{parts.netloc.lower()}"


# -- file contents ------------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML escapes)."""
    return json.dumps(value)


def _shell_quote(value: str) -> str:
    """Always single-quoted, so `source` never expands anything."""
    return "'" + value.replace("'", "'\\''") + "'"


def render_config_json(hosts: Sequence[str], token: str) -> bytes:
    """`{"auths": {"<host>": {"auth": base64("connector-proxy:<token>")}}}`, 2-space indent, trailing newline."""
    auth = base64.b64encode(f"{AUTH_USER}:{token}".encode()).decode()
    doc = {"auths": {host: {"auth": auth} for host in _distinct(hosts)}}
    return (json.dumps(doc, indent=2) + "\n").encode()


def render_buildkitd_toml(http_hosts: Sequence[str]) -> bytes:
    """One `[registry."<host>"]` table with `http = true` per plain-HTTP proxy host."""
    tables = [f"[registry.{_toml_string(host)}]\n  http = true\n" for host in _distinct(http_hosts)]
    if not tables:
        return b"# no plain-HTTP connector proxy hosts: buildkit's defaults (https) apply\n"
    return "\n".join(tables).encode()


def render_env(proxy: str, no_proxy: Sequence[str]) -> bytes:
    """`export NAME='value'` lines for the proxy variables, lower case first, then upper case."""
    values = {"http_proxy": proxy, "https_proxy": proxy, "no_proxy": ",".join(_distinct(no_proxy))}
    lines = [f"export {k}={_shell_quote(v)}" for k, v in values.items()]
    lines += [f"export {k.upper()}={_shell_quote(v)}" for k, v in values.items()]
    return ("\n".join(lines) + "\n").encode()


# -- rendering ----------------------------------------------------------------------------------


def _check_request(request: RenderRequest) -> tuple[tuple[Connector, ...], str]:
    """Validate the request; returns (distinct connectors in order, stripped token)."""
    first: dict[str, Connector] = {}
    for c in request.connectors:
        first.setdefault(c.key, c)
    connectors = tuple(first.values())
    if not connectors:
        raise RenderError("no connector to render configuration for")
    for c in connectors:
        if c.class_name != OCI_CLASS:
            raise RenderError(f"connector {c.key} has connectorClassName {c.class_name!r}, not {OCI_CLASS!r}")
    token = (request.token or "").strip()
    if not token:
        raise RenderError("the token is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise RenderError("the token contains whitespace or control characters")
    return connectors, token


def _ca_certificate(pem: str) -> bytes:
    """The CA certificate(s) for `ca.crt`; refuses a PEM that holds a private key.

    mitmproxy keeps its CA key and certificate together (`mitmproxy-ca.pem`); mounting that file
    would let every workload impersonate any host, so only certificates are accepted.
    """
    if "PRIVATE KEY" in pem:
        raise RenderError("the CA PEM contains a private key; give the certificate only (e.g. mitmproxy-ca-cert.pem)")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise RenderError("the CA PEM holds no certificate (-----BEGIN CERTIFICATE-----)")
    return (pem.strip() + "\n").encode()


def _builtin_files(request: RenderRequest, connectors: Sequence[Connector], token: str) -> dict[str, bytes | str]:
    """Each built-in file's content, or a string saying which input it lacks."""
    addresses = [proxy_address(c, request.proxy_url, request.cluster_domain) for c in connectors]
    files: dict[str, bytes | str] = {
        CONTEXT_TOKEN: token.encode(),
        PROXY_ADDRESS_FILE: "\n".join(addresses).encode(),
    }
    if request.forward_proxy:
        proxy = forward_proxy_url(connectors, token, request.forward_proxy)
        hosts = [_hostname(registry_host(c, request.proxy_url, request.cluster_domain)) for c in connectors]
        files[DOT_ENV] = render_env(proxy, [*NO_PROXY_BASE, *hosts])
        files[HTTP_PROXY_FILE] = files[HTTPS_PROXY_FILE] = proxy.encode()
    else:
        for name in (DOT_ENV, HTTP_PROXY_FILE, HTTPS_PROXY_FILE):
            files[name] = "the forward proxy address (host:port of the forward listener)"
    if request.ca_pem and request.ca_pem.strip():
        files[CA_CRT] = _ca_certificate(request.ca_pem)
    else:
        files[CA_CRT] = "the forward proxy's CA certificate"
    return files


def render(request: RenderRequest) -> dict[str, bytes]:
    """Render the files `request.names` asks for: file name -> content, sorted by file name.

    Raises RenderError for unknown names, an unusable input, or a built-in named explicitly whose
    input is missing.
    """
    names, excluded = parse_names(request.names)
    connectors, token = _check_request(request)
    files: dict[str, bytes] = {}
    producers: Mapping[str, Callable[[], bytes]] = {
        REGISTRY_CONFIG: lambda: render_config_json(
            [registry_host(c, request.proxy_url, request.cluster_domain) for c in connectors], token),
        BUILDKITD: lambda: render_buildkitd_toml(_http_hosts(connectors, request.proxy_url, request.cluster_domain)),
    }
    for name in names:
        if name in producers:
            files[CONFIGURATION_FILES[name]] = producers[name]()
    for name, content in _builtin_files(request, connectors, token).items():
        if isinstance(content, bytes):
            files[name] = content
        elif name in names:
            raise RenderError(f"{name!r} was asked for but needs {content}")
    return {name: files[name] for name in sorted(files) if name not in excluded}


# -- output -------------------------------------------------------------------------------------


def write_files(out_dir: str | os.PathLike[str], files: Mapping[str, bytes], *, mode: int = 0o600) -> list[str]:
    """Write each file into `out_dir` atomically (temporary file, fsync, rename); returns the names written.

    A reader sees either the old or the new content of a file, never a partial one. Files not in
    `files` are left alone. `mode` defaults to owner-only because the files hold a token; a pod
    whose containers run as different users may pass 0o644 (the mode of its ServiceAccount token).
    """
    out = Path(out_dir)
    for name in files:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"refusing to write {name!r}: not a plain file name")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(name)
    _fsync_dir(out)
    return written


def _fsync_dir(path: Path) -> None:
    """Make the renames durable where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
