"""A fake Kubernetes API server for tests: real REST and watch protocol over plain HTTP, in-memory state.

No real API server can run on these machines, so the Kubernetes backend is tested against this one. It speaks
enough of the wire protocol that the official ``kubernetes`` Python client runs unmodified against it (list, watch,
get, create, replace, patch, delete, status subresource, TokenReview, SubjectAccessReview, Leases).

Usage::

    with FakeApiServer(bookmark_interval=0.2) as server:
        server.write_kubeconfig(tmp_path / "kubeconfig")
        server.put_object(connector_manifest)          # create or update, fires watch events
        server.add_token("sa-token", "system:serviceaccount:ci:builder", groups=["system:serviceaccounts"])
        server.allow("system:serviceaccount:ci:builder", "get", "connectors.alauda.io", "connectors",
                     "default", "harbor")
        ...
        assert server.count("POST", "tokenreviews") == 1

Restart on the same port (an API server restart; pass ``store=`` to keep the data, as etcd would)::

    port = server.port; server.stop()
    server = FakeApiServer(port=port, store=server.store).start()

Faithful to the real API server
-------------------------------
- URL layout (``/api/v1/...``, ``/apis/{group}/{version}/...``, namespaced and all-namespaces collections), bearer
  token authentication of callers (401 otherwise), JSON bodies, 201 on create, ``Status`` objects for every error
  with the real ``reason``/``code``/``details`` and messages worded like the real ones (``secrets "x" not found``,
  ``Operation cannot be fulfilled on ...: the object has been modified; ...``).
- One global, monotonically increasing resourceVersion (a string) over all kinds; ``uid``, ``creationTimestamp``;
  ``generation`` for the CRD (1 on create, bumped when anything but metadata/status changes); no-op writes change
  nothing (no new resourceVersion, no watch event), as on a real server.
- Optimistic concurrency: PUT with a stale ``metadata.resourceVersion`` is 409 Conflict; a PUT without one is an
  unconditional update, except for custom resources where it is 422 Invalid (real CRDs refuse unconditional updates).
  A patch that carries ``metadata.resourceVersion`` is a precondition as well. DELETE honours ``preconditions``.
- Creating with ``metadata.resourceVersion`` set is a 500 error ("resourceVersion should not be set on objects to be
  created"), like the real thing. ``generateName`` works. ``dryRun=All`` is honoured.
- Status subresource (Connectors, Services, Namespaces): create drops ``.status``; PUT/PATCH of the main resource keep
  the old ``.status``; PUT/PATCH of ``/status`` change only ``.status``; GET ``/status`` returns the whole object.
- Patch types: ``application/merge-patch+json`` (RFC 7386), ``application/json-patch+json`` (RFC 6902, all six
  operations), ``application/strategic-merge-patch+json`` (see simplifications). Server-side apply is 415.
- Secrets: ``stringData`` is folded into base64 ``data`` and never stored; invalid base64 in ``data`` is a 400;
  ``type`` defaults to ``Opaque``. Services get a clusterIP and the usual defaults. Namespaces are ``Active``.
- DELETE answers a ``Success`` Status for Secrets, ConfigMaps and Leases and the deleted object for Services,
  Namespaces and custom resources (as the real registries do). Finalizers: deleting an object that has
  ``metadata.finalizers`` sets ``deletionTimestamp`` (MODIFIED); it is removed (DELETED) once an update empties the
  finalizers. Deleting a namespace deletes its contents. deletecollection honours selectors.
- Watch: chunked response, one JSON event per line; ``resourceVersion`` ""/"0" (or ``sendInitialEvents=true``) first
  sends synthetic ADDED events for the current state; otherwise all retained events after that resourceVersion are
  replayed, then live events follow. With a label/field selector an object that starts or stops matching is sent as
  ADDED/DELETED (as the watch cache does). BOOKMARK events (kind, apiVersion, metadata.resourceVersion only) every
  ``bookmark_interval`` seconds when ``allowWatchBookmarks=true``; after ``sendInitialEvents`` a bookmark annotated
  ``k8s.io/initial-events-end: "true"``. ``timeoutSeconds`` ends the stream cleanly. A resourceVersion older than
  the retained history gets HTTP 200 with one ``ERROR`` event carrying a 410 ``Expired`` Status, then the end of
  the stream (what a real API server sends); a resourceVersion newer than the store's is 504 (ResourceVersionTooLarge).
- TokenReview (``status.user``, ``status.audiences`` as the intersection of requested and token audiences, or the API
  server's own audiences when none are requested; ``status.error`` for unknown, expired or wrong-audience tokens),
  SubjectAccessReview / LocalSubjectAccessReview / SelfSubjectAccessReview (RBAC-like rules: an empty subresource
  in a rule does not grant subresources, ``*`` does), all answered with 201.

Simplified (documented deviations)
----------------------------------
- Strategic merge patch is treated as a JSON merge patch: lists are replaced, never merged by key.
- List items carry ``kind``/``apiVersion`` (the real server omits them for built-in types; the typed client does not
  care). ``status.authenticated`` is sent as ``false`` on a failed TokenReview (the real server omits it, so the
  client sees ``None``; test for falsiness, not ``is False``).
- ``limit``/``continue`` are ignored (the whole list is returned, which the API allows); list ``resourceVersion`` is
  ignored (lists are always current). No managedFields, no server-side apply, no schema validation of the CRD, no
  admission, no graceful deletion periods, no ownerReference garbage collection.
- Namespaces are created implicitly when an object is stored in one (a real server answers 404 for a missing one).
- Callers authenticate with an admin token (``admin_tokens``, default ``admin-token``) or any token of the
  TokenReview table that is valid for the API server's audiences.
- Authorization of callers is off by default: every authenticated caller may do everything. Set
  ``server.authorize_callers = True`` to check callers that are not admins against the same rules as
  SubjectAccessReviews (403 Forbidden with the real message).
- Only the resources in ``RESOURCE_TYPES`` exist; add more with ``server.store.register(ResourceType(...))``.
- Discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/{g}/{v}``, ``/version``) is minimal but well formed.

Test hooks
----------
``compact()`` drops the retained watch history (the next watch from an older resourceVersion gets 410);
``disconnect_watches(abrupt=False)`` ends every open watch stream (cleanly, like a server-side timeout, or with
``abrupt=True`` by cutting the connection mid-stream, like a crash); ``wait_for_watches(n)`` waits until n watch
streams are established and ``wait_for_no_watches()`` until none is; ``stop()`` refuses further requests on open
keep-alive connections, ends every watch stream and closes every connection before it returns;
``fail_next(n, status)`` makes the next n matching requests fail; ``requests``, ``request_log``, ``count()`` and
``bodies()`` record what the clients did.

What the kubernetes client v37 does (checked against this server)
-----------------------------------------------------------------
- ``Watch().stream`` sends ``watch=true`` plus ``resourceVersion``/``allowWatchBookmarks=true``/``timeoutSeconds``
  as given (``resource_version`` must be a str: the v37 API methods are pydantic-validated). On an ``ERROR`` event
  with code 410 it retries ONCE from the same resourceVersion unless ``timeout_seconds`` was given, then raises
  ``ApiException(status=410, reason="Expired: too old resource version: ...")``. A non-2xx watch response raises
  ``ApiException`` at once.
- When a stream ends cleanly it reconnects by itself from the last resourceVersion it saw (events and bookmarks),
  unless ``timeout_seconds`` was given (then the generator just ends). A connection cut mid-stream raises
  ``urllib3.exceptions.ProtocolError``; a refused reconnect raises ``urllib3.exceptions.MaxRetryError``.
- ``CoreV1Api.patch_*`` sends a dict as ``application/strategic-merge-patch+json`` and a list as
  ``application/json-patch+json``; ``CustomObjectsApi.patch_*`` always sends ``application/merge-patch+json``
  unless ``_content_type=`` says otherwise (a JSON patch list sent as merge patch is a 400 here).
"""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import datetime
import itertools
import json
import queue
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["ApiError", "FakeApiServer", "RESOURCE_TYPES", "RequestRecord", "ResourceType", "Store"]

DEFAULT_API_AUDIENCES = ["https://kubernetes.default.svc.cluster.local"]
ADMIN_USER = {"username": "kubernetes-admin", "uid": "", "groups": ["system:masters", "system:authenticated"]}
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ============================================================================ resource table

@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    track_generation: bool = False         # CRD semantics: bump metadata.generation on non-metadata/status changes
    allow_unconditional_update: bool = True  # False for custom resources: PUT must carry a resourceVersion
    return_deleted_object: bool = False     # DELETE answers with the object (CRs, Services, Namespaces), not a
    #                                         Success Status (Secrets, ConfigMaps, Leases), as the real registries do
    virtual: bool = False                   # create-only review APIs: nothing is stored
    field_labels: tuple[str, ...] = ("metadata.name", "metadata.namespace")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name used in messages: ``secrets``, ``connectors.connectors.alauda.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


RESOURCE_TYPES: list[ResourceType] = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True,
                 return_deleted_object=True, field_labels=("metadata.name", "status.phase")),
    ResourceType("", "v1", "secrets", "Secret", field_labels=("metadata.name", "metadata.namespace", "type")),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "services", "Service", status_subresource=True, return_deleted_object=True),
    ResourceType("connectors.alauda.io", "v1alpha1", "connectors", "Connector", status_subresource=True,
                 track_generation=True, allow_unconditional_update=False, return_deleted_object=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease",
                 field_labels=("metadata.name", "metadata.namespace", "spec.holderIdentity")),
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False, virtual=True),
    ResourceType("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview",
                 namespaced=False, virtual=True),
    ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                 namespaced=False, virtual=True),
    ResourceType("authorization.k8s.io", "v1", "localsubjectaccessreviews", "LocalSubjectAccessReview",
                 namespaced=True, virtual=True),
]


# ============================================================================ errors (Status objects)

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
            409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


class ApiError(Exception):
    """An error answered as a ``Status`` object."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = {k: v for k, v in (details or {}).items() if v not in (None, "", [], {})}
        self.headers = headers or {}

    def status(self) -> dict:
        st = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            st["details"] = self.details
        return st


def _details(rt: ResourceType, name: str | None) -> dict:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rt.qualified} "{name}" not found', "NotFound", _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'{rt.qualified} "{name}" already exists', "AlreadyExists", _details(rt, name))


def conflict(rt: ResourceType, name: str, why: str = "the object has been modified; please apply your changes "
             "to the latest version and try again") -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}', "Conflict",
                    _details(rt, name))


def invalid(rt: ResourceType, name: str, field_msg: str) -> ApiError:
    return ApiError(422, f'{rt.kind}.{rt.group} "{name}" is invalid: {field_msg}' if rt.group
                    else f'{rt.kind} "{name}" is invalid: {field_msg}', "Invalid", _details(rt, name))


def no_such_resource() -> ApiError:
    return ApiError(404, "the server could not find the requested resource", "NotFound")


def method_not_allowed() -> ApiError:
    return ApiError(405, "the server does not allow this method on the requested resource", "MethodNotAllowed")


# ============================================================================ selectors and patches

def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_KEY = r"[A-Za-z0-9_./-]+"


def parse_label_selector(text: str | None):
    """Return a predicate over a labels dict. Supports =, ==, !=, in, notin, exists, !exists."""
    reqs = []
    for part in _split_top(text or ""):
        if m := re.fullmatch(rf"!\s*({_KEY})", part):
            reqs.append(lambda lb, k=m[1]: k not in lb)
        elif m := re.fullmatch(rf"({_KEY})\s+(in|notin)\s+\((.*)\)", part):
            values = {v.strip() for v in m[3].split(",") if v.strip()}
            if m[2] == "in":
                reqs.append(lambda lb, k=m[1], vs=values: lb.get(k) in vs)
            else:
                reqs.append(lambda lb, k=m[1], vs=values: lb.get(k) not in vs)
        elif m := re.fullmatch(rf"({_KEY})\s*(==|!=|=)\s*([A-Za-z0-9_.-]*)", part):
            if m[2] == "!=":
                reqs.append(lambda lb, k=m[1], v=m[3]: lb.get(k) != v)
            else:
                reqs.append(lambda lb, k=m[1], v=m[3]: lb.get(k) == v)
        elif re.fullmatch(_KEY, part):
            reqs.append(lambda lb, k=part: k in lb)
        else:
            raise ApiError(400, f"unable to parse requirement: {part!r}", "BadRequest")
    return lambda labels: all(r(labels or {}) for r in reqs)


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def parse_field_selector(text: str | None, rt: ResourceType):
    reqs = []
    for part in _split_top(text or ""):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*)", part)
        if not m:
            raise ApiError(400, f"invalid selector: {part!r}", "BadRequest")
        key, op, value = m[1], m[2], m[3]
        if key not in rt.field_labels:
            raise ApiError(400, f'field label not supported: {key}', "BadRequest")
        if op == "!=":
            reqs.append(lambda o, k=key, v=value: (_dig(o, k) or "") != v)
        else:
            reqs.append(lambda o, k=key, v=value: (_dig(o, k) or "") == v)
    return lambda obj: all(r(obj) for r in reqs)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patch)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}", "Invalid")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _list_index(lst: list, token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(lst)
    if not token.isdigit():
        raise ApiError(422, f"invalid array index {token!r}", "Invalid")
    i = int(token)
    if i > len(lst) or (not for_add and i >= len(lst)):
        raise ApiError(422, f"array index {i} out of bounds", "Invalid")
    return i


def _resolve(doc: Any, tokens: list[str], path: str) -> Any:
    for t in tokens:
        if isinstance(doc, dict) and t in doc:
            doc = doc[t]
        elif isinstance(doc, list):
            doc = doc[_list_index(doc, t, for_add=False)]
        else:
            raise ApiError(422, f"doc is missing path: {path!r}", "Invalid")
    return doc


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def add(doc, path, value):
        tokens = _pointer(path)
        if not tokens:
            return value
        parent = _resolve(doc, tokens[:-1], path)
        last = tokens[-1]
        if isinstance(parent, dict):
            parent[last] = value
        elif isinstance(parent, list):
            parent.insert(_list_index(parent, last, for_add=True), value)
        else:
            raise ApiError(422, f"doc is missing path: {path!r}", "Invalid")
        return doc

    def remove(doc, path):
        tokens = _pointer(path)
        if not tokens:
            raise ApiError(422, "cannot remove the whole document", "Invalid")
        parent = _resolve(doc, tokens[:-1], path)
        last = tokens[-1]
        if isinstance(parent, dict) and last in parent:
            return parent.pop(last)
        if isinstance(parent, list):
            return parent.pop(_list_index(parent, last, for_add=False))
        raise ApiError(422, f"doc is missing path: {path!r}", "Invalid")

    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, f"invalid JSON patch operation: {op!r}", "BadRequest")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(doc, path)
        elif kind == "replace":
            _resolve(doc, _pointer(path), path)  # must exist
            if _pointer(path):
                remove(doc, path)
            doc = add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = remove(doc, op["from"])
            doc = add(doc, path, value)
        elif kind == "copy":
            doc = add(doc, path, copy.deepcopy(_resolve(doc, _pointer(op["from"]), op["from"])))
        elif kind == "test":
            if _resolve(doc, _pointer(path), path) != op.get("value"):
                raise ApiError(422, f"testing value {path} failed", "Invalid")
        else:
            raise ApiError(400, f"unknown JSON patch operation {kind!r}", "BadRequest")
    return doc


# ============================================================================ store and watch hub

@dataclass
class Event:
    rv: int
    type: str           # ADDED, MODIFIED, DELETED
    rt: ResourceType
    obj: dict           # the new state (for DELETED: the last state, with the deletion's resourceVersion)
    old: dict | None    # the previous state (MODIFIED only)


class Watcher:
    """One watch stream's subscription. The store feeds it under its lock, so nothing is lost or reordered."""

    def __init__(self, rt: ResourceType, namespace: str | None, label_selector: str | None,
                 field_selector: str | None):
        self.rt = rt
        self.namespace = namespace
        self._labels = parse_label_selector(label_selector)
        self._fields = parse_field_selector(field_selector, rt)
        self.queue: queue.Queue = queue.Queue()

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self._labels(meta.get("labels")) and self._fields(obj)

    def transform(self, ev: Event) -> tuple[str, dict] | None:
        """What this watcher sees of a store event (selector transitions become ADDED/DELETED)."""
        if ev.rt.key != self.rt.key:
            return None
        new = self.matches(ev.obj)
        if ev.type in ("ADDED", "DELETED"):
            return (ev.type, ev.obj) if new else None
        old = self.matches(ev.old)
        if old and new:
            return ("MODIFIED", ev.obj)
        if new:
            return ("ADDED", ev.obj)
        if old:
            return ("DELETED", ev.obj)
        return None

    def offer(self, ev: Event) -> None:
        t = self.transform(ev)
        # Progress items let the stream know how far it has seen, so bookmarks never skip an event.
        self.queue.put(("event", ev.rv, t) if t else ("progress", ev.rv, None))

    def close(self, abrupt: bool = False) -> None:
        self.queue.put(("close", abrupt, None))


_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class Store:
    """The in-memory "etcd": objects, one global resourceVersion, the retained event history and the watchers.

    Thread-safe. Shared by FakeApiServer instances that simulate restarts (pass ``store=``).
    """

    def __init__(self, *, start_rv: int = 1000, max_history: int = 10_000,
                 resource_types: list[ResourceType] | None = None):
        self._lock = threading.RLock()
        self._types: dict[tuple[str, str], ResourceType] = {}
        for rt in resource_types or RESOURCE_TYPES:
            self.register(rt)
        self._objects: dict[tuple[str, str, str, str], dict] = {}
        self._rv = start_rv
        self._compacted_rv = start_rv   # events with rv > this are retained
        self._history: collections.deque[Event] = collections.deque()
        self._max_history = max_history
        self._watchers: set[Watcher] = set()
        self._watch_cond = threading.Condition(self._lock)
        self._ip_counter = itertools.count(10)
        for ns in ("default", "kube-system", "kube-public"):
            self._ensure_namespace(ns)

    # ---------------------------------------------------------------- types
    def register(self, rt: ResourceType) -> None:
        self._types[rt.key] = rt

    @property
    def types(self) -> list[ResourceType]:
        return list(self._types.values())

    def find(self, group: str, version: str, plural: str) -> ResourceType | None:
        rt = self._types.get((group, plural))
        return rt if rt and rt.version == version else None

    def resolve(self, api_version: str | None, kind_or_resource: str) -> ResourceType:
        """Find a type by apiVersion and Kind, plural or singular (case-insensitive); apiVersion may be None."""
        want = kind_or_resource.lower()
        found = [rt for rt in self._types.values()
                 if (api_version is None or rt.api_version == api_version)
                 and want in (rt.kind.lower(), rt.plural, rt.plural.rstrip("s"))]
        if len(found) != 1:
            raise KeyError(f"unknown or ambiguous resource {api_version}/{kind_or_resource}")
        return found[0]

    # ---------------------------------------------------------------- reading
    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        with self._lock:
            obj = self._objects.get(self._key(rt, namespace, name))
            if obj is None:
                raise not_found(rt, name)
            return copy.deepcopy(obj)

    def list(self, rt: ResourceType, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None) -> tuple[list[dict], str]:
        w = Watcher(rt, namespace, label_selector, field_selector)
        with self._lock:
            items = [copy.deepcopy(o) for k, o in sorted(self._objects.items())
                     if k[:2] == rt.key and w.matches(o)]
            return items, str(self._rv)

    # ---------------------------------------------------------------- writing
    def create(self, rt: ResourceType, namespace: str | None, obj: dict, *, dry_run: bool = False,
               raw: bool = False) -> dict:
        """POST. ``raw`` (test helpers) keeps ``.status`` and ignores a resourceVersion in the body."""
        obj = self._check_body(rt, obj)
        meta = obj["metadata"]
        namespace = self._check_namespace(rt, namespace, meta, default="default" if raw else None)
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
            meta["name"] = name
        if not name:
            raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        if meta.get("resourceVersion") and not raw:
            raise ApiError(500, "resourceVersion should not be set on objects to be created", "InternalError")
        with self._lock:
            key = self._key(rt, namespace, name)
            if key in self._objects:
                raise already_exists(rt, name)
            for f in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                      "managedFields"):
                meta.pop(f, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if rt.track_generation:
                meta["generation"] = 1
            if rt.status_subresource and not raw:
                obj.pop("status", None)
            self._normalize(rt, obj, None)
            if rt.namespaced and not dry_run:
                self._ensure_namespace(namespace)
            if dry_run:
                return obj
            return self._commit(rt, "ADDED", obj, None)

    def replace(self, rt: ResourceType, namespace: str | None, name: str, obj: dict, *,
                subresource: str | None = None, dry_run: bool = False) -> dict:
        """PUT (of the object or its status)."""
        obj = self._check_body(rt, obj)
        meta = obj["metadata"]
        self._check_identity(rt, namespace, name, meta)
        with self._lock:
            old = self._current(rt, namespace, name)
            rv = meta.get("resourceVersion")
            if not rv and not rt.allow_unconditional_update:
                raise invalid(rt, name, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an "
                                        "update")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
            if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
                raise conflict(rt, name, f'Precondition failed: UID in precondition: {meta["uid"]}, UID in '
                                         f'object meta: {old["metadata"]["uid"]}')
            new = self._prepare_update(rt, old, obj, subresource)
            return self._write(rt, old, new, dry_run=dry_run)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, content_type: str, body: Any, *,
              subresource: str | None = None, dry_run: bool = False) -> dict:
        ct = (content_type or "").split(";")[0].strip().lower()
        with self._lock:
            old = self._current(rt, namespace, name)
            if ct == "application/json-patch+json":
                if not isinstance(body, list):
                    raise ApiError(400, "a JSON patch must be a list of operations", "BadRequest")
                patched = json_patch(old, body)
            elif ct in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise ApiError(400, f"a {ct} body must be a JSON object (for a list of operations send "
                                        "Content-Type application/json-patch+json; with the kubernetes client "
                                        "pass _content_type='application/json-patch+json')", "BadRequest")
                patched = merge_patch(old, body)
            elif ct.startswith("application/apply-patch"):
                raise ApiError(415, "server-side apply is not supported by the fake API server",
                               "UnsupportedMediaType")
            else:
                raise ApiError(415, f"the body of the request was in an unknown format - accepted media types "
                                    f"include: application/json-patch+json, application/merge-patch+json, "
                                    f"application/apply-patch+yaml (got {ct!r})", "UnsupportedMediaType")
            patched = self._check_body(rt, patched)
            meta = patched["metadata"]
            self._check_identity(rt, namespace, name, meta)
            if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise conflict(rt, name)    # a patch that carries a resourceVersion is a precondition
            if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
                raise conflict(rt, name, "Precondition failed: UID in precondition does not match")
            new = self._prepare_update(rt, old, patched, subresource)
            return self._write(rt, old, new, dry_run=dry_run)

    def delete(self, rt: ResourceType, namespace: str | None, name: str, *,
               preconditions: dict | None = None, dry_run: bool = False) -> dict:
        """Returns the deleted (or, with finalizers, the terminating) object."""
        with self._lock:
            old = self._current(rt, namespace, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise conflict(rt, name, f'Precondition failed: UID in precondition: {pre["uid"]}, UID in object '
                                         f'meta: {old["metadata"]["uid"]}')
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise conflict(rt, name, f'Precondition failed: ResourceVersion in precondition: '
                                         f'{pre["resourceVersion"]}, ResourceVersion in object meta: '
                                         f'{old["metadata"]["resourceVersion"]}')
            if dry_run:
                return copy.deepcopy(old)
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old)
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(rt, "MODIFIED", new, old)
            if rt.kind == "Namespace" and rt.group == "":
                for key in [k for k in self._objects if k[2] == name and self._types[k[:2]].namespaced]:
                    crt = self._types[key[:2]]
                    self._commit(crt, "DELETED", self._objects[key], None)
            return self._commit(rt, "DELETED", old, None)

    def put(self, obj: dict) -> dict:
        """Create or update, unconditionally and including ``.status`` (test helper)."""
        rt = self.resolve(obj.get("apiVersion"), obj.get("kind") or "")
        meta = obj.get("metadata") or {}
        namespace = (meta.get("namespace") or "default") if rt.namespaced else None
        with self._lock:
            old = self._objects.get(self._key(rt, namespace, meta.get("name", "")))
            if old is None:
                return self.create(rt, namespace, obj, raw=True)
            new = self._check_body(rt, obj)
            self._check_namespace(rt, namespace, new["metadata"], default=None)
            new = self._prepare_update(rt, old, new, subresource=None, keep_status=False)
            return self._write(rt, old, new)

    def compact(self, rv: int | str | None = None) -> None:
        """Drop retained history up to ``rv`` (default: everything)."""
        with self._lock:
            upto = self._rv if rv is None else int(rv)
            while self._history and self._history[0].rv <= upto:
                self._history.popleft()
            self._compacted_rv = max(self._compacted_rv, upto)

    # ---------------------------------------------------------------- watching
    def open_watch(self, rt: ResourceType, namespace: str | None, label_selector: str | None,
                   field_selector: str | None, resource_version: str | None,
                   send_initial_events: bool = False) -> tuple[Watcher, list[tuple[str, dict]], int]:
        """Register a watcher; returns it, the events to send first, and the resourceVersion they bring it to."""
        w = Watcher(rt, namespace, label_selector, field_selector)
        with self._lock:
            initial: list[tuple[str, dict]] = []
            if send_initial_events or resource_version in (None, "", "0"):
                initial = [("ADDED", o) for k, o in sorted(self._objects.items())
                           if k[:2] == rt.key and w.matches(o)]
            else:
                try:
                    rv = int(resource_version)
                except ValueError:
                    raise ApiError(400, f"invalid resource version: {resource_version!r}", "BadRequest")
                if rv < self._compacted_rv:
                    raise ApiError(410, f"too old resource version: {rv} ({self._compacted_rv + 1})", "Expired")
                if rv > self._rv:
                    raise ApiError(504, "Timeout: Too large resource version: %d, current: %d" % (rv, self._rv),
                                   "Timeout", {"causes": [{"reason": "ResourceVersionTooLarge",
                                                           "message": "Too large resource version"}],
                                               "retryAfterSeconds": 1})
                for ev in self._history:
                    if ev.rv > rv and (t := w.transform(ev)):
                        initial.append(t)
            initial = [(t, copy.deepcopy(o)) for t, o in initial]
            self._watchers.add(w)
            self._watch_cond.notify_all()
            return w, initial, self._rv

    def close_watch(self, w: Watcher) -> None:
        with self._lock:
            self._watchers.discard(w)
            self._watch_cond.notify_all()

    def watcher_count(self, rt: ResourceType | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if rt is None or w.rt.key == rt.key)

    def wait_for_watchers(self, n: int, rt: ResourceType | None = None, timeout: float = 5.0,
                          at_most: bool = False) -> bool:
        """Wait until at least (or, with ``at_most``, at most) ``n`` watchers are registered."""
        with self._watch_cond:
            return self._watch_cond.wait_for(
                lambda: (self.watcher_count(rt) <= n) if at_most else (self.watcher_count(rt) >= n), timeout)

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (rt.group, rt.plural, (namespace or "") if rt.namespaced else "", name)

    def _current(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        old = self._objects.get(self._key(rt, namespace, name))
        if old is None:
            raise not_found(rt, name)
        return old

    @staticmethod
    def _check_body(rt: ResourceType, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise ApiError(400, f"the body of the request must be a JSON object describing a {rt.kind}",
                           "BadRequest")
        obj = copy.deepcopy(obj)
        if obj.get("apiVersion") not in (None, "", rt.api_version):
            raise ApiError(400, f'the API version in the data ({obj["apiVersion"]}) does not match the expected '
                                f'API version ({rt.api_version})', "BadRequest")
        if obj.get("kind") not in (None, "", rt.kind):
            raise ApiError(400, f'the kind in the data ({obj["kind"]}) does not match the expected kind '
                                f'({rt.kind})', "BadRequest")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object", "BadRequest")
        return obj

    @staticmethod
    def _check_namespace(rt: ResourceType, namespace: str | None, meta: dict, default: str | None) -> str | None:
        if not rt.namespaced:
            meta.pop("namespace", None)
            return None
        if namespace and meta.get("namespace") and meta["namespace"] != namespace:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request", "BadRequest")
        namespace = namespace or meta.get("namespace") or default
        if not namespace:
            raise ApiError(400, "a namespace is required", "BadRequest")
        meta["namespace"] = namespace
        return namespace

    def _check_identity(self, rt: ResourceType, namespace: str | None, name: str, meta: dict) -> None:
        if meta.get("name") and meta["name"] != name:
            raise ApiError(400, f'the name of the object ({meta["name"]}) does not match the name on the URL '
                                f'({name})', "BadRequest")
        meta["name"] = name
        self._check_namespace(rt, namespace, meta, default=None)

    def _prepare_update(self, rt: ResourceType, old: dict, new: dict, subresource: str | None,
                        keep_status: bool = True) -> dict:
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            return result
        meta, ometa = new["metadata"], old["metadata"]
        for f in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if f in ometa:
                meta[f] = ometa[f]
            else:
                meta.pop(f, None)
        meta.pop("resourceVersion", None)
        if rt.status_subresource and keep_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        self._normalize(rt, new, old)
        if rt.track_generation and self._spec_part(new) != self._spec_part(old):
            meta["generation"] = int(ometa.get("generation", 0)) + 1
        return new

    @staticmethod
    def _spec_part(obj: dict) -> dict:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    def _write(self, rt: ResourceType, old: dict, new: dict, *, dry_run: bool = False) -> dict:
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)       # no-op update: no new resourceVersion, no event
        if dry_run:
            return new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(rt, "DELETED", new, None)
        return self._commit(rt, "MODIFIED", new, old)

    def _commit(self, rt: ResourceType, etype: str, obj: dict, old: dict | None) -> dict:
        """Store a change under a new resourceVersion and publish it. Caller holds the lock."""
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if etype == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        ev = Event(self._rv, etype, rt, obj, old)
        self._history.append(ev)
        while len(self._history) > self._max_history:
            self._compacted_rv = self._history.popleft().rv
        for w in list(self._watchers):
            w.offer(ev)
        return copy.deepcopy(obj)

    def _ensure_namespace(self, name: str) -> None:
        rt = self._types.get(("", "namespaces"))
        if rt is None or self._key(rt, None, name) in self._objects:
            return
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        self._normalize(rt, obj, None)
        self._commit(rt, "ADDED", obj, None)

    def _normalize(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        """Per-kind defaulting, as the real registry strategies do."""
        if rt.group != "":
            return
        if rt.kind == "Secret":
            data = obj.get("data") or {}
            for k, v in data.items():
                try:
                    base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise ApiError(400, f"Secret in version \"v1\" cannot be handled as a Secret: illegal base64 "
                                        f"data in data[{k!r}]", "BadRequest")
            for k, v in (obj.pop("stringData", None) or {}).items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            if data:
                obj["data"] = data
            obj.setdefault("type", "Opaque")
        elif rt.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if not spec.get("clusterIP"):
                prev = (old or {}).get("spec", {}).get("clusterIP")
                if not prev:
                    n = next(self._ip_counter)
                    prev = f"10.96.{n // 250}.{n % 250 + 1}"
                spec["clusterIP"] = prev
            if spec["clusterIP"] != "None":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for p in spec.get("ports") or []:
                p.setdefault("protocol", "TCP")
                if "port" in p:
                    p.setdefault("targetPort", p["port"])
            obj.setdefault("status", {"loadBalancer": {}})
        elif rt.kind == "Namespace":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})


# ============================================================================ HTTP layer

@dataclass
class RequestRecord:
    method: str
    path: str                  # without the query string
    query: dict[str, str]
    headers: Any               # the request's http.client.HTTPMessage (case-insensitive .get / [])
    body: Any                  # parsed JSON, or None
    user: str | None = None
    status: int | None = None  # response status

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _FailRule:
    remaining: int
    status: int
    method: str | None
    path_substring: str
    message: str | None


_NS = r"(?P<namespace>[^/]+)"
_REST = r"(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?/?"
ROUTES: list[tuple[re.Pattern, str]] = [(re.compile(p), h) for p, h in [
    (r"/version/?", "version"),
    (r"/(?:healthz|readyz|livez)(?:/.*)?", "health"),
    (r"/api/?", "core_versions"),
    (r"/apis/?", "group_list"),
    (r"/api/(?P<version>v1)/?", "resource_list"),
    (r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/?", "resource_list"),
    (r"/api/(?P<version>v1)/(?P<resource>namespaces)/(?P<name>[^/]+)/(?P<sub>status|finalize)/?", "resource"),
    (rf"/api/(?P<version>v1)/namespaces/{_NS}/{_REST}", "resource"),
    (rf"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/{_NS}/{_REST}", "resource"),
    (rf"/api/(?P<version>v1)/{_REST}", "resource"),
    (rf"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/{_REST}", "resource"),
]]

_VERBS_BY_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver/1.0"
    server: "_HTTPServer"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    # ---------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, code: int, obj: Any, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if self._record is not None:
            self._record.status = code

    def _dispatch(self) -> None:
        fake = self.server.fake
        self._record = None
        if self.server.closing:             # a server going away: drop the connection without an answer
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self._read_body()
        body = None
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                    if "json" in (self.headers.get("Content-Type") or "json"):
                        raise ApiError(400, "the request body is not valid JSON", "BadRequest")
            self._record = fake._record(RequestRecord(self.command, url.path, query, self.headers, body))
            fake._maybe_fail(self.command, url.path)
            user = fake._authenticate(self.headers.get("Authorization"))
            self._record.user = user["username"]
            for pattern, handler in ROUTES:
                if m := pattern.fullmatch(url.path):
                    getattr(self, "_h_" + handler)(m.groupdict(), query, body, user)
                    return
            raise no_such_resource()
        except ApiError as e:
            self._send_json(e.code, e.status(), e.headers)
        except (BrokenPipeError, ConnectionError):
            self.close_connection = True
        except Exception as e:  # a bug in the fake: say so loudly, but answer like a server would
            traceback.print_exc()
            self._send_json(500, ApiError(500, f"fake apiserver bug: {e!r}").status())

    # ---------------------------------------------------------------- discovery
    def _h_version(self, m, query, body, user):
        self._send_json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "fake",
                              "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                              "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"})

    def _h_health(self, m, query, body, user):
        data = b"ok"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _h_core_versions(self, m, query, body, user):
        self._send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.server.fake.host}:{self.server.fake.port}"}]})

    def _h_group_list(self, m, query, body, user):
        groups: dict[str, list[str]] = {}
        for rt in self.server.fake.store.types:
            if rt.group and rt.version not in groups.setdefault(rt.group, []):
                groups[rt.group].append(rt.version)
        self._send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]})

    def _h_resource_list(self, m, query, body, user):
        group, version = m.get("group") or "", m["version"]
        rts = [rt for rt in self.server.fake.store.types if rt.group == group and rt.version == version]
        if not rts:
            raise no_such_resource()
        resources = []
        for rt in rts:
            verbs = ["create"] if rt.virtual else ["create", "delete", "deletecollection", "get", "list", "patch",
                                                   "update", "watch"]
            resources.append({"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": verbs})
            if rt.status_subresource:
                resources.append({"name": rt.plural + "/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        self._send_json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                              "groupVersion": f"{group}/{version}" if group else version, "resources": resources})

    # ---------------------------------------------------------------- resources
    def _h_resource(self, m, query, body, user):
        fake = self.server.fake
        store = fake.store
        method = self.command
        rt = store.find(m.get("group") or "", m["version"], m["resource"])
        ns, name, sub = m.get("namespace"), m.get("name"), m.get("sub")
        if rt is None or (ns is not None and not rt.namespaced):
            raise no_such_resource()
        if rt.virtual:
            if method != "POST" or name is not None:
                raise method_not_allowed()
            self._send_json(201, fake._review(rt, ns, body, user))
            return
        if sub is not None and not (sub == "status" and rt.status_subresource):
            raise no_such_resource()
        if name is not None and rt.namespaced and ns is None:
            raise no_such_resource()
        watch = query.get("watch") in ("true", "1")
        if name is None:
            verb = {"GET": "watch" if watch else "list", "POST": "create", "DELETE": "deletecollection"}.get(method)
        else:
            verb = {"GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None or (sub == "status" and method == "DELETE"):
            raise method_not_allowed()
        fake._authorize_caller(user, verb, rt, ns, name, sub or "")
        dry_run = query.get("dryRun") == "All"

        if name is None and method in ("GET", "HEAD"):
            if watch:
                self._serve_watch(rt, ns, query)
            else:
                items, rv = store.list(rt, ns, query.get("labelSelector"), query.get("fieldSelector"))
                self._send_json(200, {"kind": rt.kind + "List", "apiVersion": rt.api_version,
                                      "metadata": {"resourceVersion": rv}, "items": items})
        elif name is None and method == "POST":
            if rt.namespaced and ns is None:
                raise method_not_allowed()
            self._send_json(201, store.create(rt, ns, body, dry_run=dry_run))
        elif name is None and method == "DELETE":
            items, _ = store.list(rt, ns, query.get("labelSelector"), query.get("fieldSelector"))
            deleted = []
            for item in items:
                try:
                    deleted.append(store.delete(rt, item["metadata"].get("namespace"), item["metadata"]["name"],
                                                dry_run=dry_run))
                except ApiError:
                    pass
            self._send_json(200, {"kind": rt.kind + "List", "apiVersion": rt.api_version,
                                  "metadata": {"resourceVersion": store.resource_version}, "items": deleted})
        elif method in ("GET", "HEAD"):
            self._send_json(200, store.get(rt, ns, name))
        elif method == "PUT":
            self._send_json(200, store.replace(rt, ns, name, body, subresource=sub, dry_run=dry_run))
        elif method == "PATCH":
            self._send_json(200, store.patch(rt, ns, name, self.headers.get("Content-Type", ""), body,
                                             subresource=sub, dry_run=dry_run))
        elif method == "DELETE":
            pre = (body or {}).get("preconditions") if isinstance(body, dict) else None
            obj = store.delete(rt, ns, name, preconditions=pre, dry_run=dry_run)
            if rt.return_deleted_object or obj["metadata"].get("deletionTimestamp"):
                self._send_json(200, obj)
            else:
                self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                      "details": {k: v for k, v in {"name": name, "group": rt.group,
                                                                    "kind": rt.plural,
                                                                    "uid": obj["metadata"]["uid"]}.items() if v}})
        else:
            raise method_not_allowed()

    # ---------------------------------------------------------------- watch
    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write_event(self, etype: str, obj: dict) -> None:
        self._write_chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _serve_watch(self, rt: ResourceType, ns: str | None, query: dict) -> None:
        fake = self.server.fake
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        send_initial = query.get("sendInitialEvents") in ("true", "1")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else fake.default_watch_timeout
        except ValueError:
            raise ApiError(400, f'invalid timeoutSeconds {query["timeoutSeconds"]!r}', "BadRequest")
        try:
            w, initial, last_rv = fake.store.open_watch(rt, ns, query.get("labelSelector"),
                                                        query.get("fieldSelector"), query.get("resourceVersion"),
                                                        send_initial)
        except ApiError as e:
            if e.code != 410:
                raise
            # A real API server answers 200 and sends the 410 as an ERROR event.
            self._start_stream()
            self._write_event("ERROR", e.status())
            self._write_chunk(b"")
            return
        session = _WatchSession(w)
        fake._add_session(session)
        try:
            self._start_stream()
            for etype, obj in initial:
                self._write_event(etype, obj)
            if send_initial and bookmarks:
                self._write_event("BOOKMARK", self._bookmark(rt, last_rv, initial_end=True))
            start = time.monotonic()
            deadline = start + timeout
            next_bookmark = start + fake.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._write_chunk(b"")          # timeoutSeconds: end the stream cleanly
                    return
                wake = min(deadline, now + 0.25, next_bookmark if bookmarks else deadline)
                try:
                    kind, a, b = w.queue.get(timeout=max(0.0, wake - now))
                except queue.Empty:
                    kind = None
                if kind == "close":
                    if a:                            # abrupt: cut the connection mid-stream
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    else:
                        self._write_chunk(b"")
                    return
                if kind in ("event", "progress"):
                    last_rv = a
                    if kind == "event":
                        self._write_event(*b)
                if bookmarks and time.monotonic() >= next_bookmark:
                    self._write_event("BOOKMARK", self._bookmark(rt, last_rv))
                    next_bookmark = time.monotonic() + fake.bookmark_interval
                if kind is None and self._client_gone():
                    self.close_connection = True
                    return
        except (BrokenPipeError, ConnectionError, OSError):
            self.close_connection = True
        finally:
            fake.store.close_watch(w)
            fake._remove_session(session)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if self._record is not None:
            self._record.status = 200

    @staticmethod
    def _bookmark(rt: ResourceType, rv: int, initial_end: bool = False) -> dict:
        meta: dict[str, Any] = {"resourceVersion": str(rv), "creationTimestamp": None}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}


@dataclass(eq=False)
class _WatchSession:
    watcher: Watcher
    done: threading.Event = field(default_factory=threading.Event)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    closing = False
    fake: "FakeApiServer"

    def server_bind(self):
        # HTTPServer.server_bind does a (possibly slow) reverse DNS lookup; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self.fake._lock:
            self.fake._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.fake._lock:
            self.fake._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


# ============================================================================ the server

class FakeApiServer:
    """A threaded fake kube-apiserver on 127.0.0.1. See the module docstring."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", store: Store | None = None,
                 bookmark_interval: float = 1.0, default_watch_timeout: float = 1800.0,
                 admin_token: str = "admin-token", api_audiences: list[str] | None = None):
        self.host = host
        self._requested_port = port
        self.store = store or Store()
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        # authentication: admin tokens (full access) and the TokenReview table (also accepted as callers)
        self.admin_tokens: set[str] = {admin_token}
        self.tokens: dict[str, dict] = {}
        self.api_audiences: list[str] = list(api_audiences or DEFAULT_API_AUDIENCES)
        self.require_auth = True
        # authorization: rules for SubjectAccessReviews (and callers, if authorize_callers)
        self.rules: list[dict] = []
        self.authorize_callers = False
        self._lock = threading.RLock()
        self._log: list[RequestRecord] = []
        self._fail_rules: list[_FailRule] = []
        self._sessions: set[_WatchSession] = set()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "FakeApiServer":
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self._requested_port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-apiserver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, abrupt: bool = False) -> None:
        """Stop listening, end every watch stream (cleanly unless ``abrupt``) and close every connection."""
        httpd = self._httpd
        if httpd is None:
            return
        httpd.closing = True                # keep-alive connections get no more answers
        httpd.shutdown()
        httpd.server_close()
        deadline = time.monotonic() + 2.0
        while self.disconnect_watches(abrupt=abrupt, wait=max(0.0, deadline - time.monotonic())) \
                and time.monotonic() < deadline:
            pass
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._requested_port = httpd.server_address[1]   # start() again = restart on the same port
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is not None:
            return self._httpd.server_address[1]
        return self._requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: str | Path, token: str = "admin-token", namespace: str = "default") -> Path:
        """Write a kubeconfig (JSON, which is YAML) pointing at this server with a bearer token."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake-user",
                                                      "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # ---------------------------------------------------------------- object helpers (thread-safe)
    def put_object(self, obj: dict) -> dict:
        """Create or update an object (namespace defaults to "default"), firing watch events. Writes ``.status``
        too. Returns the stored object."""
        return self.store.put(obj)

    apply = put_object

    def get_object(self, api_version: str | None, kind_or_resource: str, namespace: str | None,
                   name: str) -> dict | None:
        rt = self.store.resolve(api_version, kind_or_resource)
        try:
            return self.store.get(rt, (namespace or "default") if rt.namespaced else None, name)
        except ApiError:
            return None

    def list_objects(self, api_version: str | None, kind_or_resource: str, namespace: str | None = None,
                     label_selector: str | None = None) -> list[dict]:
        rt = self.store.resolve(api_version, kind_or_resource)
        return self.store.list(rt, namespace if rt.namespaced else None, label_selector)[0]

    def delete_object(self, api_version: str | None, kind_or_resource: str, namespace: str | None,
                      name: str) -> dict | None:
        """Delete (firing DELETED, or MODIFIED if the object has finalizers); returns it, or None if absent."""
        rt = self.store.resolve(api_version, kind_or_resource)
        try:
            return self.store.delete(rt, (namespace or "default") if rt.namespaced else None, name)
        except ApiError:
            return None

    @property
    def resource_version(self) -> str:
        return self.store.resource_version

    # ---------------------------------------------------------------- watch hooks
    def compact(self, resource_version: int | str | None = None) -> None:
        """Drop the retained watch history (up to ``resource_version``, default all): older watches get 410."""
        self.store.compact(resource_version)

    def disconnect_watches(self, abrupt: bool = False, wait: float = 2.0) -> int:
        """End every open watch stream: cleanly (terminating chunk, as on a server-side timeout) or ``abrupt``
        (the connection is cut mid-stream). Waits up to ``wait`` s for them to end; returns how many there were."""
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.watcher.close(abrupt)
        deadline = time.monotonic() + wait
        for s in sessions:
            s.done.wait(max(0.0, deadline - time.monotonic()))
        return len(sessions)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._sessions)

    def wait_for_watches(self, n: int = 1, kind_or_resource: str | None = None, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` watch streams (of that resource, if given) are established."""
        rt = self.store.resolve(None, kind_or_resource) if kind_or_resource else None
        deadline = time.monotonic() + timeout
        if not self.store.wait_for_watchers(n, rt, timeout):
            return False
        # The store registers a watcher a moment before its session exists (what
        # disconnect_watches ends): wait for that too, or a disconnect right after can miss it.
        while self.open_watches < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)  # bounded by the deadline
        return True

    def wait_for_no_watches(self, timeout: float = 5.0) -> bool:
        """Wait until no watch stream is open (e.g. after a client stopped its Watch)."""
        return self.store.wait_for_watchers(0, None, timeout, at_most=True)

    def _add_session(self, s: _WatchSession) -> None:
        with self._lock:
            self._sessions.add(s)

    def _remove_session(self, s: _WatchSession) -> None:
        with self._lock:
            self._sessions.discard(s)
        s.done.set()

    # ---------------------------------------------------------------- failure injection
    def fail_next(self, n: int = 1, status: int = 500, *, method: str | None = None, path_substring: str = "",
                  message: str | None = None) -> None:
        """Answer the next ``n`` matching requests with an error Status (429 also gets ``Retry-After: 1``)."""
        with self._lock:
            self._fail_rules.append(_FailRule(n, status, method.upper() if method else None, path_substring,
                                              message))

    def _maybe_fail(self, method: str, path: str) -> None:
        with self._lock:
            for rule in self._fail_rules:
                if rule.remaining > 0 and (rule.method in (None, method)) and rule.path_substring in path:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._fail_rules.remove(rule)
                    raise ApiError(rule.status, rule.message or f"injected failure ({rule.status})",
                                   headers={"Retry-After": "1"} if rule.status == 429 else None)

    # ---------------------------------------------------------------- request log
    def _record(self, rec: RequestRecord) -> RequestRecord:
        with self._lock:
            self._log.append(rec)
        return rec

    @property
    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far (path without the query string)."""
        with self._lock:
            return [(r.method, r.path) for r in self._log]

    def _matching(self, method: str | None, path_substring: str, watch: bool | None) -> list[RequestRecord]:
        m = None if method in (None, "*") else method.upper()
        return [r for r in self.request_log if (m is None or r.method == m) and path_substring in r.path
                and (watch is None or r.watch == watch)]

    def count(self, method: str | None = None, path_substring: str = "", *, watch: bool | None = None) -> int:
        """How many requests had this method (None/"*": any) and a path containing ``path_substring``."""
        return len(self._matching(method, path_substring, watch))

    def bodies(self, method: str | None = None, path_substring: str = "") -> list[Any]:
        """The parsed JSON bodies of the matching requests, oldest first."""
        return [r.body for r in self._matching(method, path_substring, None)]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ---------------------------------------------------------------- authentication
    def add_token(self, token: str, username: str, *, uid: str | None = None, groups: list[str] | None = None,
                  audiences: list[str] | None = None, extra: dict | None = None) -> str:
        """Register a token for TokenReview (and as a caller credential). ``audiences`` None = the API server's."""
        self.tokens[token] = {"username": username, "uid": uid or str(uuid.uuid4()),
                              "groups": list(groups or []), "audiences": audiences, "extra": extra or {}}
        return token

    def add_service_account_token(self, namespace: str, name: str, token: str | None = None,
                                  audiences: list[str] | None = None) -> str:
        """Register a ServiceAccount-style token: user system:serviceaccount:<ns>:<name> with the usual groups."""
        token = token or "sa-" + uuid.uuid4().hex
        return self.add_token(token, f"system:serviceaccount:{namespace}:{name}", audiences=audiences,
                              groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                      "system:authenticated"])

    def expire_token(self, token: str) -> None:
        self.tokens[token]["expired"] = True

    def revoke_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    def _token_review(self, token: str, audiences: list[str] | None) -> tuple[dict | None, list[str], str]:
        """(user entry or None, matched audiences, error)."""
        entry = self.tokens.get(token)
        if entry is None:
            return None, [], "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
        if entry.get("expired"):
            return None, [], "[invalid bearer token, service account token has expired]"
        wanted = list(audiences) if audiences else list(self.api_audiences)
        token_auds = entry.get("audiences")
        token_auds = list(self.api_audiences) if token_auds is None else list(token_auds)
        matched = [a for a in wanted if a in token_auds]
        if not matched:
            return None, [], (f"[invalid bearer token, token audiences {json.dumps(token_auds)} is invalid for "
                              f"the target audiences {json.dumps(wanted)}]")
        return entry, matched, ""

    def _authenticate(self, header: str | None) -> dict:
        token = ""
        if header and header.lower().startswith("bearer "):
            token = header[7:].strip()
        if token in self.admin_tokens:
            return ADMIN_USER
        entry, _, _ = self._token_review(token, None) if token else (None, [], "")
        if entry is not None:
            return entry
        if not self.require_auth:
            return {"username": "system:anonymous", "uid": "", "groups": ["system:unauthenticated"]}
        raise ApiError(401, "Unauthorized", "Unauthorized")

    # ---------------------------------------------------------------- authorization
    def allow(self, user: str, verb: str, group: str, resource: str, namespace: str = "*", name: str = "*",
              subresource: str = "") -> dict:
        """Add an allow rule. Every field may be "*". ``user`` is a username or "group:<group>".
        ``subresource`` "" matches only requests without a subresource (like RBAC); "*" matches any."""
        rule = {"user": user, "verb": verb, "group": group, "resource": resource, "namespace": namespace,
                "name": name, "subresource": subresource}
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def _evaluate(self, user: str, groups: list[str], attrs: dict) -> tuple[bool, str]:
        def ok(pattern: str, value: str) -> bool:
            return pattern == "*" or pattern == value

        with self._lock:
            rules = list(self.rules)
        for i, r in enumerate(rules):
            subject = r["user"]
            subject_ok = (subject == "*" or subject == user
                          or (subject.startswith("group:") and subject[6:] in groups))
            if (subject_ok and ok(r["verb"], attrs.get("verb", "")) and ok(r["group"], attrs.get("group", ""))
                    and ok(r["resource"], attrs.get("resource", ""))
                    and ok(r["subresource"], attrs.get("subresource", ""))
                    and ok(r["namespace"], attrs.get("namespace", ""))
                    and (r["name"] in ("*", "") or r["name"] == attrs.get("name", ""))):
                return True, (f"fake RBAC: allowed by rule #{i} ({subject} may {r['verb']} {r['resource']}"
                              f"{'/' + r['subresource'] if r['subresource'] else ''})")
        what = attrs.get("resource", "") + ("/" + attrs["subresource"] if attrs.get("subresource") else "")
        return False, (f'fake RBAC: no rule allows user "{user}" to {attrs.get("verb", "")} {what} '
                       f'"{attrs.get("name", "")}" in namespace "{attrs.get("namespace", "")}"')

    def _authorize_caller(self, user: dict, verb: str, rt: ResourceType, ns: str | None, name: str | None,
                          sub: str) -> None:
        if not self.authorize_callers or "system:masters" in user.get("groups", []):
            return
        attrs = {"verb": verb, "group": rt.group, "resource": rt.plural, "subresource": sub,
                 "namespace": ns or "", "name": name or ""}
        allowed, _ = self._evaluate(user["username"], user.get("groups", []), attrs)
        if not allowed:
            what = f"{rt.plural}/{sub}" if sub else rt.plural
            where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
            subject = f'{rt.qualified} "{name}"' if name else rt.qualified
            raise ApiError(403, f'{subject} is forbidden: User "{user["username"]}" cannot {verb} resource '
                                f'"{what}" in API group "{rt.group}"{where}', "Forbidden",
                           _details(rt, name))

    # ---------------------------------------------------------------- review APIs
    def _review(self, rt: ResourceType, namespace: str | None, body: Any, caller: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of the request must be a {rt.kind}", "BadRequest")
        spec = body.get("spec") or {}
        out = {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": {"creationTimestamp": None},
               "spec": spec}
        if rt.kind == "TokenReview":
            token = spec.get("token") or ""
            if not token:
                raise ApiError(400, "token is required for TokenReview in authentication", "BadRequest")
            entry, matched, error = self._token_review(token, spec.get("audiences"))
            if entry is None:
                out["status"] = {"authenticated": False, "user": {}, "error": error}
            else:
                user = {"username": entry["username"], "uid": entry.get("uid", ""),
                        "groups": list(entry.get("groups") or [])}
                if entry.get("extra"):
                    user["extra"] = entry["extra"]
                out["status"] = {"authenticated": True, "user": user, "audiences": matched}
            return out
        # SubjectAccessReview family
        if rt.kind == "SelfSubjectAccessReview":
            user, groups = caller["username"], list(caller.get("groups", []))
        else:
            user, groups = spec.get("user") or "", list(spec.get("groups") or [])
            if not user and not groups:
                raise ApiError(422, f'{rt.kind}.authorization.k8s.io "" is invalid: spec.user: Invalid value: "": '
                                    'at least one of user or group must be specified', "Invalid")
        ra = spec.get("resourceAttributes")
        if rt.kind == "LocalSubjectAccessReview":
            if (ra or {}).get("namespace", namespace) != namespace:
                raise ApiError(422, "spec.resourceAttributes.namespace must match metadata.namespace", "Invalid")
            ra = dict(ra or {}, namespace=namespace)
            out["metadata"]["namespace"] = namespace
        if ra is None:
            out["status"] = {"allowed": False,
                             "reason": "fake RBAC: nonResourceAttributes are not supported (denied)"}
            return out
        attrs = {k: ra.get(k) or "" for k in ("verb", "group", "resource", "subresource", "namespace", "name")}
        allowed, reason = self._evaluate(user, groups, attrs)
        out["status"] = {"allowed": allowed, "reason": reason}
        return out
