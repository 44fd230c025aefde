"""The Kubernetes backend: Connectors and Secrets from the API server, and who may use them.

`KubeStore` lists and watches Connectors and Secrets (all namespaces or a configured set) with the
official client: it resumes from the last resourceVersion, relists on 410 Gone, reconnects with
backoff, and keeps serving the last known state while the API server is unreachable.

`KubeIdentities` authenticates a ServiceAccount token with a TokenReview and authorizes it with
SubjectAccessReviews (`get` on the connector, plus `connectors/proxy` when proxy permissions are on),
caching answers briefly, keyed by a hash of the token, never the token itself.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from connector_store.identity import Identity, token_digest
from connector_store.model import CONNECTOR_API_GROUP, Catalog, build_catalog

logger = logging.getLogger(__name__)

CONNECTOR_VERSION = "v1alpha1"
CONNECTOR_PLURAL = "connectors"
# Secrets that can never hold registry credentials and can be large: not kept in memory.
IGNORED_SECRET_TYPES = {"kubernetes.io/service-account-token", "helm.sh/release.v1", "kubernetes.io/tls"}
BACKOFF_START = 0.5  # seconds before the first retry; doubles up to backoff_max, with jitter
WATCH_TIMEOUT = 300  # seconds; the server ends the watch, we resume from the last resourceVersion


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster configuration by default; a kubeconfig file when given (its server may be http://)."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    cfg = client.Configuration()
    config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


@dataclass
class _Informer:
    """One list+watch loop (a kind in a namespace, or in all namespaces)."""

    kind: str
    namespace: str | None
    list_fn: Callable[..., Any]
    synced: bool = False
    objects: dict[str, dict] = field(default_factory=dict)
    resource_version: str | None = None  # where the watch resumes
    progressed: bool = False  # listed or saw an event since the last failure


class KubeStore:
    """Connectors and Secrets from the cluster, as an always-current immutable Catalog."""

    def __init__(self, api: client.ApiClient, namespaces: Iterable[str] = (), backoff_max: float = 30.0):
        self.api = api
        self.namespaces = tuple(namespaces)
        self.backoff_max = backoff_max
        self.catalog = Catalog()
        self.connected = False
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[watch.Watch] = []
        custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        self._informers: list[_Informer] = []
        for ns in self.namespaces or (None,):
            if ns is None:
                connectors = lambda **kw: custom.list_cluster_custom_object(  # noqa: E731
                    CONNECTOR_API_GROUP, CONNECTOR_VERSION, CONNECTOR_PLURAL, **kw)
                secrets = core.list_secret_for_all_namespaces
            else:
                connectors = lambda ns=ns, **kw: custom.list_namespaced_custom_object(  # noqa: E731
                    CONNECTOR_API_GROUP, CONNECTOR_VERSION, ns, CONNECTOR_PLURAL, **kw)
                secrets = lambda ns=ns, **kw: core.list_namespaced_secret(ns, **kw)  # noqa: E731
            self._informers.append(_Informer("Connector", ns, connectors))
            self._informers.append(_Informer("Secret", ns, secrets))

    @property
    def synced(self) -> bool:
        return all(i.synced for i in self._informers)

    def refresh(self) -> bool:
        return False  # watches push changes; nothing to poll

    def start(self) -> KubeStore:
        for informer in self._informers:
            t = threading.Thread(target=self._run, args=(informer,), daemon=True,
                                 name=f"watch-{informer.kind}-{informer.namespace or 'all'}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in list(self._watches):
            w.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.synced and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(0.05)
        return self.synced

    # ------------------------------------------------------------ list + watch

    def _run(self, informer: _Informer) -> None:
        """List, then watch from the last resourceVersion seen, forever; nothing stops this loop.

        The place (resourceVersion) is kept per event, so an event that fails to apply is not
        replayed forever; the backoff starts again after any progress, and has jitter so
        replicas do not reconnect in step.
        """
        backoff = BACKOFF_START
        where = f"{informer.kind}s in {informer.namespace or 'all namespaces'}"
        while not self._stop.is_set():
            informer.progressed = False
            try:
                if informer.resource_version is None:
                    informer.resource_version = self._list(informer)
                    logger.info("listed %d %s (resourceVersion %s)", len(informer.objects), where, informer.resource_version)
                self._watch(informer)
                backoff = BACKOFF_START
                continue
            except ApiException as e:
                if e.status == 410:
                    logger.info("watch of %s expired (410 Gone): relisting", where)
                    informer.resource_version = None
                    continue
                self._disconnected(f"API server error watching {where}: {e.status} {e.reason}")
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                self._disconnected(f"API server unreachable watching {where}: {type(e).__name__}: {e}")
            except Exception as e:  # never let the watch thread die: keep serving, try again
                logger.error("unexpected error watching %s: %s", where, type(e).__name__, exc_info=True)
                self._disconnected(f"error watching {where}: {type(e).__name__}")
            if informer.progressed:
                backoff = BACKOFF_START  # it worked for a while: this is a new outage
            if self._stop.wait(backoff * random.uniform(0.5, 1.5)):
                return
            backoff = min(backoff * 2, self.backoff_max)

    def _disconnected(self, message: str) -> None:
        if self.connected or self.last_error != message:
            logger.warning("%s; serving the last known connectors", message)
        self.connected = False
        self.last_error = message

    def _list(self, informer: _Informer) -> str:
        result = informer.list_fn(_preload_content=False, _request_timeout=(10, 60))
        body = json.loads(result.data)
        objects = {}
        for item in body.get("items") or []:
            item.setdefault("kind", informer.kind)
            if self._keep(item):
                objects[_key(item)] = item
        with self._lock:
            informer.objects = objects
            informer.synced = True
            informer.progressed = True
            self.connected = True
            self.last_error = None
            self._rebuild()
        return body["metadata"]["resourceVersion"]

    def _watch(self, informer: _Informer) -> None:
        w = watch.Watch()
        self._watches.append(w)
        try:
            for event in w.stream(informer.list_fn, resource_version=informer.resource_version,
                                  allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT,
                                  _request_timeout=(10, WATCH_TIMEOUT + 30)):
                if self._stop.is_set():
                    break
                informer.progressed = True
                obj = event.get("raw_object") or {}
                if not isinstance(obj, dict):
                    continue
                rv = (obj.get("metadata") or {}).get("resourceVersion") if isinstance(obj.get("metadata"), dict) else None
                if isinstance(rv, str) and rv:
                    informer.resource_version = rv  # kept even if applying the event fails
                if event.get("type") == "BOOKMARK":
                    continue
                try:
                    self._apply(informer, event.get("type"), obj)
                except Exception as e:  # one bad object must not stop the watch (nor replay forever)
                    logger.warning("could not apply a %s event for %s: %s", event.get("type"), _key(obj), type(e).__name__)
        finally:
            self._watches.remove(w)

    def _apply(self, informer: _Informer, kind: str | None, obj: dict) -> None:
        obj.setdefault("kind", informer.kind)
        with self._lock:
            self.connected = True
            self.last_error = None
            if kind == "DELETED" or not self._keep(obj):
                informer.objects.pop(_key(obj), None)
            else:
                informer.objects[_key(obj)] = obj
            self._rebuild()

    @staticmethod
    def _keep(obj: dict) -> bool:
        return obj.get("kind") != "Secret" or obj.get("type") not in IGNORED_SECRET_TYPES

    def _rebuild(self) -> None:
        docs = [(f"{i.kind.lower()}/{k}", o) for i in self._informers for k, o in i.objects.items()]
        for d in docs:  # the list and watch APIs may omit apiVersion on items
            d[1].setdefault("apiVersion", f"{CONNECTOR_API_GROUP}/{CONNECTOR_VERSION}" if d[1]["kind"] == "Connector" else "v1")
        before = self.catalog
        self.catalog = build_catalog(docs)
        for key, c in self.catalog.connectors.items():
            old = before.connectors.get(key)
            if old != c:
                if c.usable:
                    logger.info("connector %s ready: %s", key, c.address)
                else:
                    logger.warning("connector %s not usable: %s", key, c.problem)
        for key in before.connectors.keys() - self.catalog.connectors.keys():
            logger.info("connector %s removed", key)


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


# ---------------------------------------------------------------- identities


@dataclass(frozen=True)
class KubeUser:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


class TtlCache:
    """A small time-bounded cache (answers from the API server are reused for seconds only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 10000):
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[Any, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            hit = self._entries.get(key)
            if hit and hit[1] > self.clock():
                return True, hit[0]
            self._entries.pop(key, None)
            return False, None

    def put(self, key: Any, value: Any, ttl: float) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = self.clock()
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key] = (value, self.clock() + ttl)


class SingleFlight:
    """Concurrent callers with the same key share one call (threads: the identity executor's).

    Sixteen parallel first requests with one new ServiceAccount token make one TokenReview and
    one SubjectAccessReview per connector, not sixteen. A failure is shared too (and not cached).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Any, Future] = {}

    def do(self, key: Any, fn: Callable[[], Any]) -> Any:
        with self._lock:
            call = self._calls.get(key)
            owner = call is None
            if owner:
                call = self._calls[key] = Future()
        if owner:
            try:
                call.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to every waiter, raised below
                call.set_exception(e)
            finally:
                with self._lock:
                    del self._calls[key]
        return call.result()


class KubeIdentities:
    """TokenReview + SubjectAccessReview, with short positive and negative caches and single flight."""

    blocking = True  # calls the API server: run it off the event loop

    def __init__(
        self,
        api: client.ApiClient,
        audiences: Iterable[str] = (),
        proxy_permissions: bool = False,
        allowed_ttl: float = 10.0,
        denied_ttl: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.authn = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self.audiences = list(audiences)
        self.proxy_permissions = proxy_permissions
        self.allowed_ttl = allowed_ttl
        self.denied_ttl = denied_ttl
        self._users = TtlCache(clock)
        self._decisions = TtlCache(clock)
        self._flights = SingleFlight()

    def authenticate(self, token: str):
        key = token_digest(token)
        hit, user = self._users.get(key)
        if not hit:
            def review():
                hit, cached = self._users.get(key)  # another flight may have just finished
                if hit:
                    return cached
                found = self._token_review(token)
                self._users.put(key, found, self.allowed_ttl if found else self.denied_ttl)
                return found

            user = self._flights.do(("user", key), review)
        return Identity(user.username, kube=user) if user else None

    def _token_review(self, token: str) -> KubeUser | None:
        spec = client.V1TokenReviewSpec(token=token, audiences=self.audiences or None)
        review = self.authn.create_token_review(client.V1TokenReview(spec=spec), _request_timeout=(5, 10))
        status = review.status
        if not status or not status.authenticated or not status.user:
            logger.info("token review: not authenticated (%s)", (status.error if status else "no status") or "no reason")
            return None
        u = status.user
        extra = tuple(sorted((k, tuple(v)) for k, v in (u.extra or {}).items()))
        return KubeUser(u.username or "", u.uid or "", tuple(u.groups or ()), extra)

    def authorize(self, identity, namespace: str, name: str) -> bool:
        user: KubeUser = identity.kube
        key = (user, namespace, name)
        hit, allowed = self._decisions.get(key)
        if not hit:
            def decide():
                hit, cached = self._decisions.get(key)
                if hit:
                    return cached
                decision = self._access(user, namespace, name, "") and (
                    not self.proxy_permissions or self._access(user, namespace, name, "proxy")
                )
                self._decisions.put(key, decision, self.allowed_ttl if decision else self.denied_ttl)
                return decision

            allowed = self._flights.do(("decision", key), decide)
        return allowed

    def _access(self, user: KubeUser, namespace: str, name: str, subresource: str) -> bool:
        attrs = client.V1ResourceAttributes(
            verb="get", group=CONNECTOR_API_GROUP, resource=CONNECTOR_PLURAL, namespace=namespace,
            name=name, subresource=subresource or None,
        )
        spec = client.V1SubjectAccessReviewSpec(
            user=user.username, uid=user.uid or None, groups=list(user.groups) or None,
            extra={k: list(v) for k, v in user.extra} or None, resource_attributes=attrs,
        )
        review = self.authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec), _request_timeout=(5, 10))
        allowed = bool(review.status and review.status.allowed)
        if not allowed:
            what = f"connectors{'/' + subresource if subresource else ''}"
            logger.info("%s may not get %s %s/%s: %s", user.username, what, namespace, name,
                        (review.status.reason if review.status else "") or "no reason given")
        return allowed
