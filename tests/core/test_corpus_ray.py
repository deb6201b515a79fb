"""`--ray` on one local Ray runtime (two CPUs) for the whole module: the same answers as `--each`, caches
written by the workers, a worker killed mid-run whose documents are still answered once each; and Ctrl-C
on the real CLI, which starts and stops a runtime of its own."""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from core.cluster import RayOptions, run_ray
from core.corpus import AskTask, Item
from core.generation import Decoding
from core.methods import make_method
from core.storage import load_cache
from tests.helpers import default_sigint, fastkv, leftovers, write_texts
from tests.tiny_models import fastkv_command, save_slow_llama

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray runtime and its workers take a while to start on a small machine

QUESTION = "When was the lighthouse automated?"
MAX_NEW = 4
DOCS = {f"doc{i}.txt": f"Record {i}: the lighthouse at point {i} was automated in {1950 + 7 * i}.\n" for i in range(6)}


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(build_model_folder) -> Path:
    return build_model_folder


@pytest.fixture
def docs(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    return write_texts(DOCS)


def lines(result) -> list[dict]:
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def by_document(records: list[dict]) -> dict[str, str]:
    return {r["documents"][0]["name"]: r["answer"] for r in records}


def test_ray_gives_exactly_the_answers_each_gives(docs, model):
    args = ["ask", *docs, QUESTION, "--model", model, "--max-new-tokens", MAX_NEW, "--json", "--quiet"]
    local = lines(fastkv(*args, "--each"))
    remote = lines(fastkv(*args, "--ray", "--ray-workers", 2))
    assert len(remote) == len(docs)
    assert by_document(remote) == by_document(local)


def test_ray_workers_write_the_caches_and_cache_ask_reads_them_on_ray(docs, model):
    result = fastkv("cache", "build", *docs, "-o", "caches", "--ray", "--model", model, "--json", "--quiet")
    built = lines(result)
    assert sorted(r["document"] for r in built) == docs
    assert sorted(os.listdir("caches")) == sorted(name.replace(".txt", ".fkv") for name in docs)
    for name in os.listdir("caches"):
        load_cache(Path("caches") / name)
    args = ["cache", "ask", "caches", QUESTION, "--max-new-tokens", MAX_NEW, "--json", "--quiet"]
    remote = {r["cache"]: r["answer"] for r in lines(fastkv(*args, "--ray"))}
    local = {r["cache"]: r["answer"] for r in lines(fastkv(*args))}
    assert remote == local and len(local) == len(docs)


def test_a_worker_killed_mid_run_has_its_document_retried_and_every_answer_comes_once(docs, model):
    task = AskTask(QUESTION, make_method("fastkv"), Decoding(MAX_NEW))
    items = [Item(i, name) for i, name in enumerate(docs)]
    workers, outcomes = [], []

    def kill_another(outcome):
        outcomes.append(outcome)
        if len(outcomes) == 1:  # the other worker is busy with its own document: kill it
            os.kill(next(pid for pid in workers if pid != outcome.worker), signal.SIGKILL)

    run_ray(RayOptions(workers=2), (str(model), None, None), task, items, kill_another, on_workers=workers.extend)
    assert sorted(o.index for o in outcomes) == list(range(len(docs)))
    assert not any(o.failed for o in outcomes), [o.error for o in outcomes]
    local = lines(fastkv("ask", *docs, QUESTION, "--model", model, "--max-new-tokens", MAX_NEW, "--json", "--each"))
    assert {o.name: o.records[0]["answer"] for o in outcomes} == by_document(local)


# --- Ctrl-C: finished caches stay valid, the unfinished one leaves nothing, the CLI's runtime is gone ---------


@pytest.fixture(scope="module")
def slow(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("slow-model")
    save_slow_llama(folder, tiny_tokenizer, 8192)
    return folder


@pytest.mark.parametrize("command", ["cache build", "ask"])
def test_ctrl_c_on_a_ray_run_exits_130_keeps_finished_caches_and_stops_its_runtime(command, tmp_path, slow):
    names = [f"log{i}.txt" for i in range(6)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(" ".join(f"In {1800 + j} the keeper logged {j + i} ships." for j in range(300)))
    if command == "cache build":
        args = ["cache", "build", *names, "--each", "-o", "out"]
    else:
        args = ["ask", *names, QUESTION, "--max-new-tokens", str(MAX_NEW)]
    mark = uuid.uuid4().hex  # inherited by every process the CLI starts: its Ray runtime and workers
    # `--ray` alone starts a runtime of its own, whatever cluster RAY_ADDRESS names (here none answers)
    env = {**os.environ, "FASTKV_RUN_MARK": mark, "RAY_ADDRESS": "127.0.0.1:9"}
    process = subprocess.Popen(
        [*fastkv_command(), *args, "--model", str(slow), "--json", "--ray", "--ray-workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=default_sigint, start_new_session=True,
    )  # fmt: skip
    first = process.stdout.readline()  # one document is done, the other worker is busy: interrupt the run
    assert json.loads(first)["documents" if command == "ask" else "document"]
    assert len(processes_marked(mark)) > 2  # the CLI, its runtime and workers: what must be gone after
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    rest, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == "interrupted"
    records = [json.loads(line) for line in [first, *rest.splitlines()]]  # whole lines only
    assert len(records) < len(names) and not any("error" in r for r in records)
    if command == "cache build":
        out = tmp_path / "out"
        assert leftovers(out) == []
        built = sorted(os.listdir(out))
        assert {Path(r["output"]).name for r in records} <= set(built) and len(built) < len(names)
        for name in built:
            _, manifest = load_cache(out / name)
            assert [d.name for d in manifest.documents] == [name.replace(".fkv", ".txt")]
    deadline = time.monotonic() + 15
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_marked(mark) == []


def processes_marked(mark: str) -> list[str]:
    """The command lines of the live processes whose environment holds `mark`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"FASTKV_RUN_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
