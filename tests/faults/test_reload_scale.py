"""Fast, quiet reloads: with 5,000 connector files, one new file is served within seconds, only the
changed file is parsed again, and a reload logs what changed rather than every connector."""

from __future__ import annotations

import time

import yaml

from proxyproc import ProxyProcess, basic, connector, write_manifests

FILES = 5000


def test_a_new_file_among_5000_is_served_quickly_and_reloads_are_quiet(world, tmp_path, capsys):
    d = tmp_path / "connectors"
    d.mkdir()
    for i in range(FILES):
        (d / f"c{i:05d}.yaml").write_text(yaml.safe_dump(connector("bulk", f"c{i:05d}", "http://127.0.0.1:1")))
    proxy = ProxyProcess(tmp_path, d, world.tokens_file).start()
    try:
        token = world.builder_token

        def served(name: str) -> bool:
            r = proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/x/tags/list", auth=basic("x", token))
            return b"not found" not in r.data

        log_before = len(proxy.output())
        started = time.monotonic()
        write_manifests(d, "late.yaml", [connector("default", "late", world.registry.url)])
        proxy.wait_for(lambda: served("late"), 10)
        took = time.monotonic() - started
        with capsys.disabled():
            print(f"\n[reload] {FILES} files: a new connector was served {took:.2f} s after its file appeared")
        new_log = proxy.output()[log_before:]
        # Quiet: the reload logged the new connector, not the 5,000 others.
        assert "connector default/late ready" in new_log
        assert new_log.count("connector bulk/") == 0, new_log[:2000]
    finally:
        proxy.stop()
