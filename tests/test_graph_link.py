"""The host side of a one-graph decode step: how a replay and the host's answers to its handshakes meet."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from krasis.engine.graph_link import HostLink


class FakeRuntime:
    """Stands in for HybridExperts: ``serve_graph_step`` runs ``serve`` (the test's stand-in for the Rust loop)."""

    def __init__(self, serve):
        self.serve = serve

    def serve_graph_step(self, flags, slots, ids_out, count=True, prefetch=0, hints=None):
        self.serve()


def link_with(serve) -> HostLink:
    return HostLink(FakeRuntime(serve), slots=[0, 1], top_k=2, device=torch.device("cpu"))


def test_a_replay_is_launched_while_the_host_already_serves():
    serving = threading.Event()
    launched = threading.Event()

    def serve():
        serving.set()
        assert launched.wait(10), "the replay was not launched beside the host's serving"

    def replay():  # a launch that only returns once the host serves: run one after the other, this would hang
        assert serving.wait(10), "the host did not serve while the replay was being launched"
        launched.set()

    link_with(serve).run(replay, threaded=False)
    assert launched.is_set()


def test_a_failed_launch_is_raised_instead_of_the_wait_it_caused():
    launched = threading.Event()

    def replay():
        raise ValueError("launch failed")

    def serve_briefly():  # the GPU never signals: the host gives up (quickly, for the test)
        if not launched.wait(0.2):
            raise RuntimeError("timed out waiting for the GPU")

    with pytest.raises(ValueError, match="launch failed"):
        link_with(serve_briefly).run(replay, threaded=False)


def test_each_step_waits_for_its_own_launch():
    replays = []
    link = link_with(lambda: None)
    for i in range(3):
        link.run(lambda i=i: replays.append(i), threaded=False)
        assert replays == list(range(i + 1)), "run returns only once its replay has been queued"


def test_an_abort_waits_for_a_launch_still_pending():
    link = link_with(lambda: None)
    link.run(lambda: None, threaded=False)  # the launcher exists
    queued = threading.Event()

    def slow_replay():
        time.sleep(0.2)
        queued.set()

    link._launcher.start(slow_replay, None)  # as if the wait for its result had been interrupted
    link._abort()
    assert queued.is_set() and not link._launcher.pending, "the GPU is waited for only once the replay is queued"
    replays = []
    link.run(lambda: replays.append(1), threaded=False)
    assert replays == [1]


def test_the_launch_thread_ends_with_its_link():
    before = {t for t in threading.enumerate() if t.name == "krasis-graph-launch"}
    link = link_with(lambda: None)
    link.run(lambda: None, threaded=False)
    (thread,) = {t for t in threading.enumerate() if t.name == "krasis-graph-launch"} - before
    del link
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
