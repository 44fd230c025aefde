"""The proxy's own token endpoint: clients built for the registry token flow get a proxy token.

A registry challenges with `Bearer realm=...,service=...,scope=...`, and clients such as containerd
(BuildKit's resolver), oras-py's default backend, docker and skopeo fetch a token from the realm
and send it back. The proxy does the same (DESIGN section 3):

- `GET /.connectors/token?service=&scope=` with `Basic base64(<any user>:<ServiceAccount token>)`;
- `POST /.connectors/token` with the OAuth2 form `grant_type=password` (`username`, `password`:
  the ServiceAccount token) or `grant_type=refresh_token` (a proxy token), which containerd tries
  first.

The caller is admitted exactly as for any request (`ClientAuth.admit`: authenticate, authorize the
connector, look it up), and gets a short-lived **proxy token**: an HS256 JWT bound to the subject,
the connector and the granted scopes, signed with a key every replica reads from the same file
(a Secret), so any replica accepts what another issued and nothing is stored. It is useless
against the registry itself; upstream tokens never leave the proxy. The issued token is handed to
`LateSecrets` (it is never recorded), and a POST body holding the client's token is replaced
before anything records the flow.
"""

from __future__ import annotations

import logging
import weakref
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from mitmproxy import http

from addons import oci
from addons.client_auth import ClientAuth, Refusal, parse_client_credential, valid_token
from addons.gate import fail_closed
from addons.proxy_token import SHARED_SERVICE, Access, ProxyTokens, connector_of, parse_scope
from addons.routing import is_reverse
from addons.scrub import LateSecrets

logger = logging.getLogger(__name__)

PATH = "/.connectors/token"
MAX_FORM = 64 * 1024
CONNECTOR_ACTIONS = ("pull", "push", "delete")  # what using a connector allows (a policy may narrow it)
PLACEHOLDER = b'{"token": "<redacted: proxy token, not recorded>"}'
REDACTED_FORM = b"<redacted: token request form, not recorded>"


class TokenEndpoint:
    """`/.connectors/token`: the realm of the proxy's Bearer challenge (tokens: `ClientAuth.tokens`)."""

    def __init__(self, client_auth: ClientAuth, secrets: LateSecrets):
        self.client_auth = client_auth
        self.secrets = secrets
        # The GET credential, read before Scrub removes the header (never put on the flow).
        self._credentials: weakref.WeakKeyDictionary[http.HTTPFlow, str | None] = weakref.WeakKeyDictionary()

    @fail_closed(credentials=True)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_reverse(flow) or flow.request.path.partition("?")[0] != PATH:
            return
        if flow.request.method not in ("GET", "POST"):
            flow.response = oci.refusal(flow.request, 405, "UNSUPPORTED", f"{PATH} answers GET and POST")
            return
        length = flow.request.headers.get("content-length", "")
        chunked = "transfer-encoding" in flow.request.headers
        if flow.request.method == "POST" and (chunked or not (length.isascii() and length.isdigit()
                                                               and len(length) < 10 and int(length) <= MAX_FORM)):
            # The form is read whole: only a small one with a length (no chunked gigabytes).
            flow.response = oci.refusal(flow.request, 413, "SIZE_INVALID",
                                        f"{PATH} takes a form of at most {MAX_FORM} bytes with a Content-Length")
            return
        self._credentials[flow] = parse_client_credential(flow.request.headers.get("authorization"))
        flow.request.stream = False  # the form is small and read whole in `request`

    @fail_closed(credentials=True)
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_reverse(flow) or flow.request.path.partition("?")[0] != PATH:
            return
        params = parse_qsl(flow.request.path.partition("?")[2], keep_blank_values=True)
        token: str | None
        if flow.request.method == "POST":
            form = _form(flow.request.raw_content or b"")
            flow.request.content = REDACTED_FORM  # the client's token must not be recorded
            params += form
            grant = _last(form, "grant_type")
            if grant == "password":
                token = _last(form, "password")
                token = token if token and valid_token(token) else None
            elif grant == "refresh_token":
                token = _last(form, "refresh_token")
                token = token if token and valid_token(token) else None
            else:
                flow.response = oci.refusal(flow.request, 400, "UNSUPPORTED",
                                            "grant_type must be password or refresh_token")
                return
        else:
            token = self._credentials.pop(flow, None)
        service = _last(params, "service") or ""
        # Several scope params, or several scopes in one (space-separated, as in a challenge).
        access = [a for a in (parse_scope(v) for k, vs in params if k == "scope" for v in vs.split()) if a]
        ref = connector_of(service, access)
        if ref is None and service not in ("", SHARED_SERVICE):
            flow.response = oci.refusal(flow.request, 400, "NAME_INVALID", "service names no connector (<namespace>/<name>)")
            return
        subject = None
        if token is not None and ProxyTokens.looks_like_ours(token):
            # A refresh with one of our own tokens: the same subject and connector, never more.
            claims = self.client_auth.tokens.verify(token)
            if claims is None or (ref is not None and claims.connector != f"{ref[0]}/{ref[1]}"):
                flow.response = self.client_auth.refuse(flow.request, Refusal(401, "UNAUTHORIZED", "invalid or expired token"))
                return
            subject = claims.subject
            access = [a for a in access if claims.allows(a.name if a.type == "repository" else None, a.actions)]
        else:
            result = await self.client_auth.admit(token, [ref] if ref else [])
            if isinstance(result, Refusal):
                flow.response = self.client_auth.refuse(flow.request, result)
                return
            subject = result.identity.subject
            # A connector is authorized as a whole (the SubjectAccessReview is on the Connector),
            # so each repository asked for is granted every action the caller may take there:
            # clients such as oras-py reuse a pull token for the push that follows.
            access = [Access(a.type, a.name, CONNECTOR_ACTIONS) if a.type == "repository" else a for a in access]
            policy = result.connectors[0].policy if result.connectors else None
            if policy is not None and ref is not None:  # ... that the connector's policy leaves them
                prefix = f"namespaces/{ref[0]}/connectors/{ref[1]}/"  # path-form names -> the registry's

                def allowed(a: Access) -> tuple[str, ...]:
                    repo = a.name[len(prefix):] if a.name.startswith(prefix) else a.name
                    return tuple(x for x in a.actions if x in policy.allowed_actions(subject, repo))

                access = [Access(a.type, a.name, allowed(a)) if a.type == "repository" else a for a in access]
                access = [a for a in access if a.actions]
        connector = f"{ref[0]}/{ref[1]}" if ref else ""
        if not connector:
            access = []  # a token for the shared ping opens no repository
        issued, lifetime = self.client_auth.tokens.issue(subject, connector, service or SHARED_SERVICE, access)
        body = (
            '{"token": "%s", "access_token": "%s", "expires_in": %d, "issued_at": "%s"}'
            % (issued, issued, lifetime, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        ).encode()
        flow.response = http.Response.make(200, PLACEHOLDER, {"Content-Type": "application/json", "Cache-Control": "no-store"})
        self.secrets.response_body(flow, body)


def _form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        return []


def _last(params: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in params if k == name]
    return values[-1] if values else None
