"""The directory store: connectors added, changed and removed while the proxy runs."""

from __future__ import annotations

import json

from conftest import REGISTRY_USER
from proxyproc import basic, connector, secret, write_manifests


def status_of(proxy, token, name):
    r = proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/store/app/tags/list", auth=basic("x", token))
    return r.status, json.loads(r.data)["errors"][0]["code"] if r.status >= 400 else None


def test_connectors_are_picked_up_changed_and_removed_without_restart(world, proxy):
    token = world.builder_token
    assert status_of(proxy, token, "late") == (404, "NAME_UNKNOWN")
    path = write_manifests(world.connectors_dir, "late.yaml", [
        connector("default", "late", world.registry.url, "late-secret"),
        secret("default", "late-secret", REGISTRY_USER, "wrong-password"),
    ])
    try:
        # added: served (the token server refuses the wrong password: 502 naming the connector)
        proxy.wait_for(lambda: status_of(proxy, token, "late")[0] != 404)
        assert status_of(proxy, token, "late") == (502, "UNAUTHORIZED")
        # changed: the right password is used at once (the credential version changed)
        write_manifests(world.connectors_dir, "late.yaml", [
            connector("default", "late", world.registry.url, "late-secret"),
            secret("default", "late-secret", REGISTRY_USER, world.registry_password, encoded=True),
        ])
        proxy.wait_for(lambda: status_of(proxy, token, "late")[0] != 502)
        assert status_of(proxy, token, "late") == (404, "NAME_UNKNOWN")  # the registry's answer: repo unknown
    finally:
        path.unlink()
    # removed
    proxy.wait_for(lambda: status_of(proxy, token, "late") == (404, "NAME_UNKNOWN")
                   and "not found" in proxy.request("GET", "/v2/namespaces/default/connectors/late/x/tags/list",
                                                    auth=basic("x", token)).data.decode())


def test_unusable_connector_is_reported_in_the_log(world, proxy):
    log = proxy.output()
    assert "connector default/broken not usable" in log
    assert "secret default/missing-secret not found" in log
