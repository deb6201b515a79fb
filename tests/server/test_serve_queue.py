"""One request at a time on the model: the bounded queue, a client that leaves, a signal that stops the
server, and the LRU of loaded caches (that one without a server)."""

import json
import signal
import threading
from types import SimpleNamespace

import httpx
import pytest

from fastkv_cli.server.caches import CacheLRU
from tests.server.serving import DEADLINE_S, LONG, ask_body, counts, events, start_server, wait_for


def test_a_request_beyond_the_queue_gets_503(http, server):
    """--queue 1: one request runs, one waits, the third is refused at once."""
    waiting: dict = {}
    with http.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # held: a dropped line iterator would close the stream
        next(line for line in lines if '"text"' in line)  # it is generating
        second = threading.Thread(target=lambda: waiting.update(response=http.post("/ask", json=ask_body())))
        second.start()
        wait_for(lambda: counts(http)["waiting"] == 1, "the second request to wait")
        refused = http.post("/ask", json=ask_body())
        assert refused.status_code == 503
        assert "busy" in refused.json()["error"]["message"]
    second.join(DEADLINE_S)  # leaving the first stream cancelled it; the waiting one ran
    assert waiting["response"].status_code == 200
    assert events(waiting["response"])[-1]["event"] == "answer"


def test_a_client_that_leaves_stops_its_generation(http):
    before = counts(http)
    with http.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"text"' in line)
        assert counts(http)["running"]  # still generating when the client leaves
    after = wait_for(
        lambda: (c := counts(http))["cancelled"] > before["cancelled"] and not c["running"] and c, "the cancel"
    )
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]  # it was stopped, not finished


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(model, allowed, tmp_path, sig):
    log = tmp_path / "serve.log"
    process, url = start_server(model, allowed, log)
    try:
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            with client.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as response:
                lines = response.iter_lines()
                next(line for line in lines if '"text"' in line)
                process.send_signal(sig)
                last = json.loads([line for line in lines if line.strip()][-1])
        code = process.wait(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert last["event"] == "error" and "shutting down" in last["error"]["message"]
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
    assert not list(allowed.glob(".*.tmp"))  # no half-written cache file


def test_cache_lru_evicts_the_least_recently_used_within_its_budget(tmp_path):
    loads = []

    def fake_load(path):
        loads.append(path.name)
        return SimpleNamespace(cache=SimpleNamespace(nbytes=int(path.read_text()), paused=None))

    engine = SimpleNamespace(load_saved=fake_load)
    files = {name: tmp_path / name for name in ("a", "b", "c", "huge")}
    for name, size in (("a", 40), ("b", 40), ("c", 40), ("huge", 1000)):
        files[name].write_text(str(size))
    lru = CacheLRU(budget_bytes=100)

    for name in ("a", "b", "a", "c", "a", "b", "huge", "huge"):
        lru.get(files[name], engine=engine)

    # a, b loaded; a hit; c evicts b (least recent); a hit; b evicts c; huge is used but never kept
    assert loads == ["a", "b", "c", "b", "huge", "huge"]
    assert lru.summary() == {"loaded": 2, "bytes": 80, "budget_bytes": 100}
    files["a"].write_text("41")  # rewritten: another size, so it is loaded again
    lru.get(files["a"], engine=engine)
    assert loads[-1] == "a" and lru.summary()["bytes"] == 81
