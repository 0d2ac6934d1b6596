"""The ``tessera`` command as a user runs it: a real subprocess on a temporary data dir."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import dialogue, sparse_index_types


def run(tmp_path, *args, stdin=None):
    env = {**os.environ, "TESSERA_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "ops.cli.main", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def test_ingest_reports_bad_lines_indexes_the_rest_and_answers_jobs(tmp_path):
    lines = [e.model_dump_json(by_alias=True) for e in dialogue()]
    bad = json.loads(lines[3])
    del bad["sender_id"]
    lines[3] = json.dumps(bad)
    lines.insert(6, "{not json")
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    proc = run(tmp_path, "ingest", str(events))
    assert proc.returncode == 1
    assert f"{events}:4: missing_field: sender_id" in proc.stderr
    assert f"{events}:7: invalid_json" in proc.stderr
    assert "ingested 10 events, 2 rejected" in proc.stderr

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"schema": "tessera.query.v1", "job_id": "a", "tenant_id": "t1", "user_id": "u",
                    "query": "sourdough starter"}),
        json.dumps({"schema": "tessera.query.v1", "job_id": "b", "user_id": "u", "query": "glacier"}),
        json.dumps({"schema": "tessera.query.v1", "job_id": "c", "tenant_id": "t1", "user_id": "u",
                    "query": "laptop repair shop", "top_k": 1}),
    ]) + "\n")
    proc = run(tmp_path, "query", "--jobs", str(jobs))
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["job_id"] for r in results] == ["a", "b", "c"]
    assert results[0]["status"] == "ok" and results[0]["fragments"]
    assert results[1]["status"] == "error" and results[1]["error"]["code"] == "missing_field"
    assert "tenant_id" in results[1]["error"]["message"]
    assert len(results[2]["fragments"]) == 1
    assert set(results[2]["fragments"][0]["message_ids"]) & {"m009", "m010", "m011"}

    proc = run(tmp_path, "query", "glacier", "hike")
    assert proc.returncode == 1 and "tenant_id" in proc.stdout
    proc = run(tmp_path, "query", "--tenant", "t1", "--user", "u", "--json", "glacier", "hike")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["fragments"][0]["conversation_id"] == "c1"


def test_a_query_on_the_default_path_imports_neither_torch_nor_qdrant_client(tmp_path, monkeypatch):
    """What makes ``tessera query`` start in under a second: the ONNX encoder (its export cached by the
    ingest before) and the edge store; torch and qdrant-client take seconds to import."""
    for name in ("TESSERA_ENCODER", "TESSERA_VECTOR_STORE", "TESSERA_QDRANT_URL"):
        monkeypatch.delenv(name, raising=False)
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(e.model_dump_json(by_alias=True) for e in dialogue()) + "\n")
    assert run(tmp_path, "ingest", str(events)).returncode == 0
    probe = ("import sys\nfrom ops.cli.main import main\ncode = main(['query', '--tenant', 't1', '--user', 'u', 'glacier'])\n"
             "print(code, sorted(m for m in ('torch', 'sentence_transformers', 'qdrant_client') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TESSERA_DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stderr
    assert "glacier" in proc.stdout.lower()
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout


def test_demo_prints_answers(tmp_path):
    proc = run(tmp_path, "demo")
    assert proc.returncode == 0, proc.stderr
    assert "0 rejected" in proc.stdout
    assert "a photo of a blue glacier" in proc.stdout
    assert "no matching conversation" not in proc.stdout


def test_dead_letters_lists_replays_and_drops_parked_conversations(tmp_path):
    from indexer.state import open_state

    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(e.model_dump_json(by_alias=True) for e in dialogue("c1") + dialogue("c2")) + "\n")
    assert run(tmp_path, "ingest", str(events)).returncode == 0
    state = open_state(None, tmp_path / "data")
    with state.transaction():
        for conversation in ("c1", "c2"):
            state.merge_pending("t1", conversation, {"full": True}, lambda a, b: b)
            for _ in range(5):
                state.record_failure("t1", conversation, "BulkItemsFailed: mapper_parsing_exception", 5)
    state.close()
    listed = [json.loads(line) for line in run(tmp_path, "dead-letters", "list").stdout.splitlines()]
    assert [(p["conversation_id"], p["attempts"]) for p in listed] == [("c1", 5), ("c2", 5)]
    assert "mapper_parsing_exception" in listed[0]["reason"]
    proc = run(tmp_path, "dead-letters", "replay", "--tenant", "t1", "--conversation", "c1")
    assert proc.returncode == 0 and "t1/c1: indexed" in proc.stderr
    assert run(tmp_path, "dead-letters", "drop", "--tenant", "t1", "--conversation", "c2").returncode == 0
    assert run(tmp_path, "dead-letters", "list").stdout == ""


def test_stack_down_forgets_the_pids_it_stopped(tmp_path):
    """A later ``down`` must not signal pids the system may have given to other processes since."""
    from ops.stack.local import Stack

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stack = Stack(tmp_path / "data")
    stack.dir.mkdir(parents=True)
    stack.state_file.write_text(json.dumps({"redis_port": 1, "kafka_port": 2, "pids": {"redis": sleeper.pid}}))
    assert stack.status()["running"]
    stack.down()
    sleeper.wait(timeout=30)
    assert not stack.state_file.exists()
    assert stack.status() == {"running": False, "healthy": True, "processes": {}, "health": {}}


def test_a_dead_workers_tasks_come_back_within_minutes_and_never_run_twice_at_once():
    """Redelivery waits for the visibility timeout; every task is killed before it, so a task still
    running is never handed to a second worker."""
    from workers.app import VISIBILITY_TIMEOUT_S, app

    if "TESSERA_VISIBILITY_TIMEOUT" in os.environ:
        return
    assert VISIBILITY_TIMEOUT_S <= 300
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit < VISIBILITY_TIMEOUT_S


def test_every_task_the_workers_run_is_routed_by_the_shared_contract():
    """The consumer publishes by the names in schemas/routing.py; the worker registers exactly those."""
    import workers.tasks  # noqa: F401  (registers the tasks)
    from schemas.routing import QUEUES, TASKS
    from workers.app import app

    registered = {name for name in app.tasks if name.startswith("tessera.")}
    assert registered == set(TASKS)
    assert set(TASKS.values()) <= set(QUEUES)
    assert all(app.amqp.router.route({}, name)["queue"].name == queue for name, queue in TASKS.items())


def test_an_ingested_file_leaves_no_point_appendable(tmp_path, embedder):
    """``tessera ingest FILE`` is a bulk load: it ends with the stores refreshed, so the next process searches
    optimized segments instead of loading an appendable one into its memory."""
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from ops.runtime.jsonl import ingest_file

    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(e.model_dump_json(by_alias=True) for e in dialogue()) + "\n")
    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="edge"), embedder=embedder)
    assert ingest_file(engine, str(events), progress=False) == (len(dialogue()), 0)
    vectors, keywords = (getattr(s, "inner", s) for s in (engine.vectors, engine.keywords))
    window = vectors.shards["window"].info()
    # Four vectors a window (its text vector, its keys, its BM25 terms and its turn's), each in an optimized segment.
    assert window.points_count and window.indexed_vectors_count == 4 * window.points_count
    assert not any(store._pending[kind] for store in (keywords, vectors) for kind in store.shards)
    engine.close()


def test_optimize_rebuilds_segments_an_earlier_version_built_and_answers_the_same(tmp_path, embedder, monkeypatch):
    """A data dir whose BM25 indexes an earlier version kept on the heap with four-byte weights is searched as it
    is; only the optimizer rebuilds those segments, and a store that is only read never runs it: ``tessera
    optimize`` does."""
    import indexer.stores.edge as edge
    from qdrant_edge import EdgeSparseVectorParams, Modifier

    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from ops.runtime.jsonl import ingest_file

    def placements():
        return {(index_type, weights) for _, index_type, weights in sparse_index_types(tmp_path / "data")}

    for name in [name for name in os.environ if name.startswith("TESSERA_")]:
        monkeypatch.delenv(name)  # the defaults, whatever stack the suite started before exported
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(e.model_dump_json(by_alias=True) for e in dialogue()) + "\n")
    with monkeypatch.context() as earlier:
        earlier.setattr(edge, "_sparse_params", lambda: EdgeSparseVectorParams(
            modifier=Modifier.Idf, full_scan_threshold=edge.FULL_SCAN_THRESHOLD))
        engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="edge"), embedder=embedder)
        assert ingest_file(engine, str(events), progress=False) == (len(dialogue()), 0)
        engine.close()
    assert placements() == {("ImmutableRam", "float32")}
    query = ("query", "--tenant", "t1", "--user", "ann", "--json", "glacier")
    before = run(tmp_path, *query)
    assert before.returncode == 0 and json.loads(before.stdout)["fragments"], before.stderr
    proc = run(tmp_path, "optimize", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "optimized vectors:window" in proc.stderr
    assert placements() == {("Mmap", "uint8")}
    after = run(tmp_path, *query)

    def answer(proc):
        return [(f["fragment_id"], f["message_ids"]) for f in json.loads(proc.stdout)["fragments"]]

    def scores(proc):
        return [f["score"] for f in json.loads(proc.stdout)["fragments"]]

    # The rebuilt indexes keep a weight in one byte (``edge.SPARSE_WEIGHTS``): the same turns, nearly the same scores.
    assert answer(after) == answer(before)
    assert scores(after) == pytest.approx(scores(before), rel=0.02)
