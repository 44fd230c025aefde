"""Connector status in the cluster: proxy address, conditions, and the `c-<name>` host-form Service.

With several replicas only the holder of a Lease writes. For each Connector it records
`status.proxy.httpAddress.url` and the conditions `SecretReady`, `LivenessReady` (the registry
answers `GET /v2/`), `AuthReady` (a token request for the `repository` param's scope proves the
credential) and `Ready`, with reasons a user can act on; and it makes the host form resolvable by
creating an ExternalName Service `c-<name>` in the connector's namespace that points at the proxy.
The checks are pure functions over a `RegistryClient`; the writer only moves their results.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from mitmproxy import ctx

from addons.store import ConnectorStore
from connector_store.addresses import DEFAULT_CLUSTER_DOMAIN, host_form_host, service_host
from addons.registry_client import RegistryClient, UpstreamError, basic_header
from connector_store.model import CONNECTOR_API_GROUP, Connector

logger = logging.getLogger(__name__)

CONDITION_TYPES = ("SecretReady", "LivenessReady", "AuthReady", "Ready")


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False", "Unknown"
    reason: str
    message: str = ""


def proxy_url(connector: Connector, external_url: str = "", cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """The advertised address: in-cluster host form with the path-form prefix (works both ways)."""
    path = f"/namespaces/{connector.namespace}/connectors/{connector.name}"
    if external_url:
        return external_url.rstrip("/") + path
    host = host_form_host(connector.name, connector.namespace, cluster_domain) or service_host(
        f"c-{connector.name}", connector.namespace, cluster_domain)
    return f"http://{host}{path}"


def check_connector(connector: Connector, client: RegistryClient) -> list[Condition]:
    """Probe the registry with the connector's credentials; one Condition per type."""
    if not connector.usable:
        secret_reasons = {"SecretNotFound", "SecretInvalid", "CASecretNotFound", "CASecretInvalid"}
        secret = (Condition("SecretReady", "False", connector.reason, connector.problem or "")
                  if connector.reason in secret_reasons else Condition("SecretReady", "Unknown", connector.reason))
        blocked = Condition("LivenessReady", "Unknown", connector.reason, connector.problem or "")
        return _with_ready([secret, blocked, Condition("AuthReady", "Unknown", connector.reason)])
    secret = (Condition("SecretReady", "True", "SecretValid") if connector.secret_name
              else Condition("SecretReady", "True", "NoSecret", "anonymous access"))
    try:
        challenge = client.probe(connector)
    except UpstreamError as e:
        return _with_ready([secret, Condition("LivenessReady", "False", "RegistryUnreachable", str(e)),
                            Condition("AuthReady", "Unknown", "RegistryUnreachable")])
    live = Condition("LivenessReady", "True", "RegistryReachable")
    return _with_ready([secret, live, _check_auth(connector, client, challenge)])


def _check_auth(connector: Connector, client: RegistryClient, challenge) -> Condition:
    creds = connector.credentials
    repository = connector.param("repository")
    if challenge.kind == "none":
        return Condition("AuthReady", "True", "NoAuthRequired")
    if creds is None or creds.kind == "bearer":
        return Condition("AuthReady", "Unknown", "StaticToken", "a static token cannot be checked without using it")
    try:
        if challenge.kind == "basic":
            assert connector.address
            headers = {"Authorization": basic_header(creds.username, creds.password)} if creds.kind == "basic" else {}
            address = connector.address
            resp = client.send(connector, "GET", address.scheme, address.host, address.port,
                               address.path_prefix + "/v2/", headers)
            if resp.status == 200:
                return Condition("AuthReady", "True", "CredentialsAccepted")
            return Condition("AuthReady", "False", "AuthFailed", f"the registry answered HTTP {resp.status} to the credentials")
        scopes = (f"repository:{repository}:pull",) if repository else ()
        client.fetch_token(connector, challenge, scopes)
    except UpstreamError as e:
        return Condition("AuthReady", "False", "AuthFailed", str(e))
    what = f"a pull token for {repository}" if repository else "a token"
    return Condition("AuthReady", "True", "TokenIssued", f"the token server issued {what}")


def _with_ready(conditions: list[Condition]) -> list[Condition]:
    failing = next((c for c in conditions if c.status != "True"), None)
    ready = (Condition("Ready", "True", "Ready") if failing is None
             else Condition("Ready", "False", failing.reason, f"{failing.type}: {failing.message}".rstrip(": ")))
    return conditions + [ready]


def merge_conditions(old: list[dict], new: list[Condition], now: str, generation: int | None = None) -> list[dict]:
    """Kubernetes conditions; lastTransitionTime only moves when the status changes, and
    observedGeneration says which spec they were computed from."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = previous.get(c.type)
        changed = not prev or prev.get("status") != c.status
        condition = {
            "type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
            "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        out.append(condition)
    return out


def _summary(conditions) -> tuple:
    return tuple((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                 for c in conditions or [])


def host_form_service(connector_obj: dict, proxy_service: str, proxy_namespace: str,
                      cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> dict:
    """An ExternalName Service `c-<name>`: `c-<name>.<ns>.svc.<cluster domain>` resolves to the proxy."""
    meta = connector_obj["metadata"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": f"c-{meta['name']}", "namespace": meta["namespace"],
            "labels": {"app.kubernetes.io/managed-by": "oci-connector-proxy", "connectors.alauda.io/connector": meta["name"]},
            "ownerReferences": [{"apiVersion": f"{CONNECTOR_API_GROUP}/v1alpha1", "kind": "Connector",
                                 "name": meta["name"], "uid": meta.get("uid", ""), "controller": True}],
        },
        "spec": {"type": "ExternalName", "externalName": service_host(proxy_service, proxy_namespace, cluster_domain),
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def service_differs(existing, wanted: dict) -> bool:
    """Whether a Service (the client's model object or a dict) differs from the one we want."""
    if not isinstance(existing, dict):
        from kubernetes import client as k8s

        existing = k8s.ApiClient().sanitize_for_serialization(existing)
    spec = existing.get("spec") or {}
    ports = [{"name": p.get("name"), "port": p.get("port"), "protocol": p.get("protocol", "TCP")}
             for p in spec.get("ports") or []]
    want = wanted["spec"]
    return (spec.get("type") != want["type"] or spec.get("externalName") != want["externalName"]
            or ports != want["ports"])


class LeaseElector:
    """Leader election on a coordination.k8s.io Lease (one status writer among replicas)."""

    def __init__(self, api, namespace: str, name: str, identity: str, duration: int = 15):
        from kubernetes import client

        self.leases = client.CoordinationV1Api(api)
        self.client = client
        self.namespace, self.name, self.identity, self.duration = namespace, name, identity, duration

    def try_acquire(self) -> bool:
        from kubernetes.client.rest import ApiException

        now = datetime.now(timezone.utc)
        spec = self.client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.duration,
                                       renew_time=now, acquire_time=now)
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = self.client.V1Lease(metadata=self.client.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
            try:
                self.leases.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        held = lease.spec.holder_identity
        renewed = lease.spec.renew_time
        expired = renewed is None or (now - renewed).total_seconds() > (lease.spec.lease_duration_seconds or self.duration)
        if held != self.identity and not expired:
            return False
        if held == self.identity:
            spec.acquire_time = lease.spec.acquire_time
        lease.spec = spec
        try:
            self.leases.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as e:
            if e.status == 409:  # someone else renewed or took it first
                return False
            raise


class ConnectorStatus:
    """The status writer addon (Kubernetes store only)."""

    def __init__(self, store: ConnectorStore):
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    def load(self, loader):
        loader.add_option("status_writer", bool, False, "Write Connector status and c-<name> Services (Kubernetes store).")
        loader.add_option("status_interval", int, 60, "Seconds between full status checks of every connector.")
        loader.add_option("proxy_namespace", str, os.environ.get("POD_NAMESPACE", "connectors-system"),
                          "Namespace of the proxy's Service and status Lease.")
        loader.add_option("proxy_service", str, "connector-proxy", "Name of the proxy's Service (target of c-<name>).")
        loader.add_option("external_url", str, "", "Base URL clients outside the cluster use (NodePort/Ingress).")
        loader.add_option("host_services", bool, True, "Create the c-<name> ExternalName Service per connector.")

    def running(self):
        if ctx.options.status_writer and self._thread is None:
            from connector_store.kube import KubeStore

            backend = self.store.backend
            if not isinstance(backend, KubeStore):
                logger.warning("status_writer needs the Kubernetes store; not writing status")
                return
            opts = ctx.options
            self._thread = threading.Thread(
                target=self._run, name="connector-status", daemon=True,
                args=(backend, opts.status_interval, opts.proxy_namespace, opts.proxy_service, opts.external_url,
                      opts.host_services, RegistryClient(opts.upstream_timeout, opts.ssl_insecure,
                                                         opts.ssl_verify_upstream_trusted_ca,
                                                         ca_path=opts.ssl_verify_upstream_trusted_confdir),
                      opts.cluster_domain),
            )
            self._thread.start()

    def done(self):
        self._stop.set()

    def _run(self, backend, interval, proxy_namespace, proxy_service, external_url, host_services, registry,
             cluster_domain=DEFAULT_CLUSTER_DOMAIN) -> None:
        from kubernetes import client as k8s

        custom = k8s.CustomObjectsApi(backend.api)
        core = k8s.CoreV1Api(backend.api)
        elector = LeaseElector(backend.api, proxy_namespace, "connector-proxy-status", self.identity)
        last_catalog, last_full = None, 0.0
        while not self._stop.is_set():
            try:
                leader = elector.try_acquire()
            except Exception as e:  # API server away: try again later
                logger.debug("lease: %s", e)
                leader = False
            catalog = backend.catalog
            due = time.monotonic() - last_full >= interval or catalog is not last_catalog
            if leader and due and backend.synced:
                for connector in catalog.connectors.values():
                    if self._stop.is_set():
                        return
                    try:
                        self._reconcile(connector, custom, core, registry, proxy_namespace, proxy_service,
                                        external_url, host_services, cluster_domain)
                    except Exception as e:
                        logger.warning("status of connector %s not written: %s", connector.key, e)
                last_catalog, last_full = catalog, time.monotonic()
            self._stop.wait(1.0)

    def _reconcile(self, connector, custom, core, registry, proxy_namespace, proxy_service, external_url,
                   host_services, cluster_domain=DEFAULT_CLUSTER_DOMAIN) -> None:
        from kubernetes.client.rest import ApiException

        obj = custom.get_namespaced_custom_object(CONNECTOR_API_GROUP, "v1alpha1", connector.namespace,
                                                  "connectors", connector.name)
        conditions = check_connector(connector, registry)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = obj.get("status") or {}
        generation = (obj.get("metadata") or {}).get("generation")
        merged = merge_conditions(status.get("conditions") or [], conditions, now,
                                  generation if isinstance(generation, int) else None)
        url = proxy_url(connector, external_url, cluster_domain)
        current = (((status.get("proxy") or {}).get("httpAddress") or {}).get("url"), _summary(status.get("conditions")))
        if current != (url, _summary(merged)):  # write only changes: no update storm with many replicas
            body = {"status": {"proxy": {"httpAddress": {"url": url}}, "conditions": merged}}
            custom.patch_namespaced_custom_object_status(CONNECTOR_API_GROUP, "v1alpha1", connector.namespace,
                                                         "connectors", connector.name, body)
            ready = merged[-1]
            logger.info("connector %s status: Ready=%s %s", connector.key, ready["status"], ready["reason"])
        if host_services:
            service = host_form_service(obj, proxy_service, proxy_namespace, cluster_domain)
            try:
                core.create_namespaced_service(connector.namespace, service)
                logger.info("created Service %s/c-%s for the host form", connector.namespace, connector.name)
            except ApiException as e:
                if e.status != 409:
                    raise
                # It exists: make it say what it must (someone may have edited or replaced it).
                existing = core.read_namespaced_service(service["metadata"]["name"], connector.namespace)
                if service_differs(existing, service):
                    core.patch_namespaced_service(service["metadata"]["name"], connector.namespace,
                                                  {"metadata": {"labels": service["metadata"]["labels"],
                                                                "ownerReferences": service["metadata"]["ownerReferences"]},
                                                   "spec": service["spec"]})
                    logger.info("updated Service %s/c-%s for the host form", connector.namespace, connector.name)
