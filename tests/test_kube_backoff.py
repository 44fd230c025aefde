"""The Kubernetes store's reconnect loop: backoff grows during an outage, with jitter, and starts
again after any progress (a list or an event). (A bad object that fails to apply is in
tests/faults/test_bad_objects.py.)"""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from connector_store import kube
from connector_store.kube import KubeStore, _Informer


class Script:
    """Stands in for the list and watch calls: each step raises, or makes progress and then fails."""

    def __init__(self, steps):
        self.steps = list(steps)

    def next(self, informer):
        step = self.steps.pop(0)
        if step == "fail":
            raise ApiException(status=500, reason="Internal Server Error")
        if step == "progress":
            informer.progressed = True
            raise ApiException(status=500, reason="Internal Server Error")  # works a while, then drops
        raise AssertionError(step)


class RecordingStop:
    """`_stop.wait(seconds)` records the backoff instead of waiting; stops after the script ends."""

    def __init__(self, script: Script):
        self.script = script
        self.waits: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return not self.script.steps

    def is_set(self) -> bool:
        return not self.script.steps


def run(steps) -> list[float]:
    store = KubeStore(client.ApiClient(client.Configuration()), backoff_max=30.0)
    script = Script(steps)
    store._stop = RecordingStop(script)  # type: ignore[assignment]
    informer = _Informer("Connector", None, lambda **kw: None)
    store._list = lambda inf: script.next(inf)  # type: ignore[method-assign]
    store._run(informer)
    return store._stop.waits


def test_backoff_grows_during_an_outage_with_jitter():
    waits = run(["fail"] * 6)
    assert all(kube.BACKOFF_START * 0.5 * 2 ** i <= w <= kube.BACKOFF_START * 1.5 * 2 ** i for i, w in enumerate(waits[:5]))


def test_backoff_starts_again_after_progress():
    """Three 500s, then it works for a while, then a new outage: the first retry is quick again
    (it used to continue from the old backoff: a change took 84.5 s to apply)."""
    waits = run(["fail", "fail", "fail", "progress", "fail"])
    assert waits[2] >= kube.BACKOFF_START * 0.5 * 4
    assert waits[3] <= kube.BACKOFF_START * 1.5  # after progress: from the start
