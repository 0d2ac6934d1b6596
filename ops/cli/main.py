"""The ``tessera`` command line: embedded ingest, queries, the demo and the evaluation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ops.runtime.assemble import open_engine, open_reasoner, text_model_reencoded, warm_up
from ops.runtime.config import Config, ConfigError, describe, export_default, prepare_process
from ops.runtime.jsonl import answer, ingest_file, lines
from schemas import QUERY_SCHEMA, QueryJob, Result


#: Where `tessera eval locomo` writes its table.
EVAL_OUT = "results/locomo-eval.json"


def _engine(args, reasoning: bool = False, rebuild: bool = False):
    """The engine of the data dir; ``reasoning`` loads the VLM in-process when one is configured."""
    config = Config.from_env(args.data_dir)
    return open_engine(config, reasoner=open_reasoner(config) if reasoning else None, rebuild=rebuild)


def cmd_ingest(args) -> int:
    engine = _engine(args)
    try:
        ok, failed = ingest_file(engine, args.file, progress=not args.quiet)
    finally:
        engine.close()
    print(f"ingested {ok} events, {failed} rejected", file=sys.stderr)
    return 1 if failed else 0


def print_result(result: Result, engine, as_json: bool, tenant_id: str | None = None) -> None:
    if as_json:
        print(result.to_json())
        return
    if result.status == "error":
        print(f"error {result.error.code}: {result.error.message}")
        return
    print(f"query: {result.rewritten_query}" + (f"  (turns chosen by {result.reasoned_by})" if result.reasoned_by else ""))
    if result.clarifying_question is not None:
        question = result.clarifying_question
        print(f"  {question.text} " + " | ".join(f"({i}) {o}" for i, o in enumerate(question.options, start=1)))
        print("  (answer with --history 'user: <your query>' --history 'assistant: <the question>' <option>)")
    if not result.fragments:
        print("  no matching conversation")
    for rank, fragment in enumerate(result.fragments, start=1):
        print(f"  {rank}. {fragment.conversation_id} {fragment.start_at:%Y-%m-%d %H:%M}  score {fragment.score:.3f}")
        turns = engine.state.turns_by_id(tenant_id, fragment.conversation_id, fragment.message_ids)
        for message_id in fragment.message_ids:
            turn = turns.get(message_id)
            if turn is None:
                continue
            print(f"     [{message_id}] {turn.sender_name or turn.sender_id}: {turn.text}")
            for image in turn.images:
                print(f"         image: {image.uri} ({image.caption or 'no caption'})")


def _history(entries: list[str]) -> list[dict]:
    turns = []
    for entry in entries:
        role, _, text = entry.partition(":")
        if role.strip() not in ("user", "assistant") or not text.strip():
            raise SystemExit(f"tessera query: --history {entry!r}: write 'user: TEXT' or 'assistant: TEXT'")
        turns.append({"role": role.strip(), "text": text.strip()})
    return turns


def cmd_query(args) -> int:
    engine = _engine(args, reasoning=True)
    try:
        if args.jobs:
            warm_up(engine)
            for number, raw in lines(args.jobs):
                print(answer(engine, raw, number).to_json(), flush=True)
            return 0
        if not args.text and not args.image:
            print("tessera query: give TEXT, --image URI or --jobs FILE", file=sys.stderr)
            return 2
        record = {"schema": QUERY_SCHEMA, "job_id": "cli", "query": " ".join(args.text), "top_k": args.top_k,
                  "reasoning": args.reasoning, "history": _history(args.history)}
        if args.image:
            record["image"] = {"uri": args.image}
        if args.tenant:
            record["tenant_id"] = args.tenant
        if args.user:
            record["user_id"] = args.user
        if args.conversation:
            record["filters"] = {"conversation_id": args.conversation}
        result = answer(engine, json.dumps(record), 0)
        print_result(result, engine, args.json, args.tenant)
        return 0 if result.status != "error" else 1
    finally:
        engine.close()


def cmd_demo(args) -> int:
    from ops.demo.generate import generate
    from ops.demo.topics import EXAMPLE_QUERIES

    data_dir = Config.from_env(args.data_dir).data_dir
    events = generate(data_dir / "demo")
    print(f"demo corpus: {events}", file=sys.stderr)
    args.data_dir = str(data_dir)
    engine = _engine(args)
    try:
        ok, failed = ingest_file(engine, str(events))
        print(f"ingested {ok} events ({failed} rejected); {engine.state.counts()}\n")
        for i, (tenant, user, text) in enumerate(EXAMPLE_QUERIES):
            job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"demo-{i}", "tenant_id": tenant,
                                           "user_id": user, "query": text, "top_k": 2})
            print(f"[{tenant} / {user}]", end=" ")
            print_result(engine.query(job), engine, as_json=False, tenant_id=tenant)
            print()
    finally:
        engine.close()
    from ops.serve.keys import KeyStore

    config = Config.from_env(data_dir)
    keys = KeyStore(config.state_url, config.data_dir)
    try:
        key = keys.create("acme", "demo page")[1]
    finally:
        keys.close()
    print("See it in the browser: run `make serve` (tessera serve), then open\n"
          f"  http://127.0.0.1:8080/#key={key}&user=anna\n"
          "(an API key of the demo tenant acme, searching as anna; `tessera keys list` shows it)")
    return 0


def cmd_eval(args) -> int:
    from ops.eval.retrieval import main_eval

    if args.cross_validate:
        from ops.eval.crossval import main_cross_validate

        out = args.out if args.out != EVAL_OUT else "results/locomo-cv.json"
        return main_cross_validate(args.dir, out, progress=not args.quiet)

    return main_eval(args.dir, args.out, progress=not args.quiet, one_conversation=args.one_conversation,
                     messy=args.messy, typos=args.typos, screenshots=args.screenshots)


def cmd_eval_dialogue(args) -> int:
    from ops.eval.dialogue import main_dialogue

    return main_dialogue(args.dir, args.out, progress=not args.quiet)


def cmd_bench(args) -> int:
    from ops.bench.report import run

    run(args)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_delete(args) -> int:
    engine = _engine(args)
    try:
        if args.conversation:
            report = engine.delete_conversation(args.tenant, args.conversation)
        else:
            report = engine.forget_user(args.tenant, args.user)
    finally:
        engine.close()
    print(f"deleted {report.deleted} messages, {report.fragments_deleted} fragments", file=sys.stderr)
    return 0


def cmd_reindex(args) -> int:
    """Rebuild both indexes from the conversation state (into another vector store, too: a data dir from
    before the edge store is moved over this way); an interrupted run resumes where it stopped."""
    from tqdm import tqdm

    engine = _engine(args, rebuild=True)
    try:
        with tqdm(desc="reindex", unit="conversation", file=sys.stderr, disable=args.quiet) as bar:
            report = engine.reindex(reencode=args.reencode or engine.reencode_needed, progress=bar.update)
        if engine.reencode_needed:
            text_model_reencoded(Config.from_env(args.data_dir).data_dir)
    finally:
        engine.close()
    print(f"reindexed: {report.fragments_written} fragments written, {report.encoded} texts encoded",
          file=sys.stderr)
    return 0


def cmd_optimize(args) -> int:
    """Rebuild the embedded stores' segments that an earlier version built otherwise (int8 vectors, BM25 indexes
    on the heap): they are searched as they are until the optimizer next runs, which writes make happen but reads
    never do. Minutes where ``reindex`` takes hours: the vectors are not encoded again."""
    import time

    from tqdm import tqdm

    engine = _engine(args)
    started = time.perf_counter()
    try:
        with tqdm(desc="optimize", unit="shard", file=sys.stderr, disable=args.quiet) as bar:
            done = engine.optimize(progress=lambda kind: bar.update(1))
    finally:
        engine.close()
    print(f"optimized {', '.join(done) or 'nothing (no store of the embedded engine)'} in"
          f" {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_dead_letters(args) -> int:
    """Parked conversations (state) and dead tasks (Redis): list them, replay them, or drop them."""
    if args.tasks:
        return _dead_tasks(args)
    engine = _engine(args)
    try:
        if args.action == "list":
            for p in engine.state.parked():
                print(json.dumps({"tenant_id": p.tenant_id, "conversation_id": p.conversation_id,
                                  "attempts": p.attempts, "reason": p.reason, "parked_at": p.parked_at}))
            return 0
        if not (args.tenant and args.conversation):
            print("replay and drop name a parked conversation: --tenant T --conversation C", file=sys.stderr)
            return 2
        if args.action == "replay":
            ok = engine.replay_parked(args.tenant, args.conversation)
            print(f"{args.tenant}/{args.conversation}: {'indexed' if ok else 'not indexed (see dead-letters list)'}",
                  file=sys.stderr)
        else:
            ok = engine.drop_parked(args.tenant, args.conversation)
            print(f"{args.tenant}/{args.conversation}: {'dropped' if ok else 'was not parked'}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        engine.close()


def _dead_tasks(args) -> int:
    """Tasks in ``tessera:tasks:dead``: replay sends each again under a new id, drop removes them."""
    import redis

    from workers.app import app
    from ops.runtime.config import redis_url
    from workers.runtime import DEAD_LETTER_KEY

    client = redis.Redis.from_url(redis_url())
    records = [json.loads(r) for r in client.lrange(DEAD_LETTER_KEY, 0, -1)]
    if args.action == "list":
        for record in records:
            print(json.dumps(record))
        return 0
    for raw_record in client.lrange(DEAD_LETTER_KEY, 0, -1):
        record = json.loads(raw_record)
        if args.action == "replay":
            app.send_task(record["task"], args=record.get("args") or [], kwargs=record.get("kwargs") or {},
                          queue=record.get("queue"))
        client.lrem(DEAD_LETTER_KEY, 1, raw_record)
    print(f"{len(records)} dead tasks {'replayed' if args.action == 'replay' else 'dropped'}", file=sys.stderr)
    return 0


def cmd_consume(args) -> int:
    """Run a consumer per topic, each in its own thread; SIGTERM stops both, each commits and leaves."""
    import logging
    import signal
    import threading

    import redis

    from consumer.loop import TesseraConsumer
    from schemas.routing import MESSAGES, QUERIES
    from workers.app import app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = Config.from_env()
    topics = {"messages": MESSAGES, "queries": QUERIES}
    consumers = [TesseraConsumer(app, topics[name], config, redis.Redis.from_url(config.redis_url))
                 for name in args.topics.split(",")]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: [c.stop() for c in consumers])
    stats, failed = {}, []

    def run(consumer) -> None:
        try:
            stats[consumer.topic] = consumer.run().__dict__
        except BaseException:
            logging.getLogger("tessera.consumer").exception("consumer of %s died", consumer.topic)
            failed.append(consumer.topic)
            for other in consumers:
                other.stop()

    threads = [threading.Thread(target=run, args=(c,), name=c.topic) for c in consumers]
    for t in threads:
        t.start()
    if config.metrics_port:
        from ops.runtime.telemetry import serve

        serve(config.metrics_port, host=config.metrics_host, health=lambda: all(t.is_alive() for t in threads) and all(
            c.healthy(config.health_stall_s) for c in consumers))
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    print(json.dumps(stats), file=sys.stderr)
    # A consumer that died takes the process down with it, so a supervisor restarts it.
    return 1 if failed else 0


def cmd_worker(args) -> int:
    from ops.stack.local import worker_command

    command = worker_command(args.queues, args.concurrency, args.name, args.pool)
    os.execv(command[0], command)


def cmd_produce(args) -> int:
    from consumer.produce import produce_file

    sent = produce_file(args.kind, args.file)
    print(f"produced {sent} records", file=sys.stderr)
    return 0


def cmd_results(args) -> int:
    from consumer.produce import read_results

    read_results(follow=args.follow, idle_timeout_s=args.timeout)
    return 0


def cmd_stack(args) -> int:
    from ops.stack.local import Stack

    stack = Stack(Config.from_env(args.data_dir).data_dir)
    if args.action == "up":
        info = stack.up(workers=args.workers, concurrency=args.concurrency)
        print(json.dumps(info, indent=2))
        print(f"logs: {stack.dir / 'logs'}", file=sys.stderr)
    elif args.action == "down":
        stack.down()
        print("stopped", file=sys.stderr)
    else:
        status = stack.status()
        print(json.dumps(status, indent=2))
        # Like service managers: 3 when nothing runs, 1 when a process is dead or unhealthy.
        return 3 if not status["running"] else 0 if status["healthy"] else 1
    return 0


def use_stack_environment(data_dir: str | None) -> None:
    """Commands run next to a stack (``tessera stack up``) talk to its Redis and broker."""
    from ops.stack.local import Stack

    stack = Stack(Config.from_env(data_dir).data_dir)
    if stack.state_file.exists():
        for key, value in stack.env().items():
            export_default(key, value)


def cmd_serve(args) -> int:
    """The HTTP API and the search page over this data dir's engine, until interrupted."""
    import logging

    import uvicorn

    from ops.serve.app import Limits, create_app, warm_in_background
    from ops.serve.keys import KeyStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = Config.from_env(args.data_dir)
    engine = _engine(args, reasoning=True)
    keys = KeyStore(config.state_url, config.data_dir)
    app = create_app(engine, keys, Limits(config.api_rate, config.api_burst, config.api_max_body), config.image_policy)
    warm_in_background(app, engine)
    print(f"tessera serve: http://{args.host}:{args.port}/ (API at /v1, OpenAPI at /openapi.json)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.close()
        keys.close()
    return 0


def cmd_keys(args) -> int:
    """API keys: ``create`` prints the new key as its last word (shown once), ``list``, ``revoke``."""
    from ops.serve.keys import KeyStore

    config = Config.from_env(args.data_dir)
    keys = KeyStore(config.state_url, config.data_dir)
    try:
        if args.action == "create":
            if not args.tenant:
                print("tessera keys create: --tenant is required", file=sys.stderr)
                return 2
            record, key = keys.create(args.tenant, args.name or "")
            print(f"key {record.key_id} for tenant {record.tenant_id} (shown once, keep it): {key}")
        elif args.action == "list":
            for record in keys.list(args.tenant):
                state = "revoked" if record.revoked_at else "live"
                print(f"{record.key_id}  {record.tenant_id}  {state}  {record.name}")
        else:
            if not args.key_id:
                print("tessera keys revoke: give the key id", file=sys.stderr)
                return 2
            if not keys.revoke(args.key_id):
                print(f"tessera keys revoke: no live key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        keys.close()
    return 0


def cmd_config(args) -> int:
    """Every variable Tessera reads, its value here and its meaning; exit 1 when one does not parse."""
    try:
        rows = describe()
    except ConfigError as exc:
        print(f"tessera config: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"variable": n, "value": v, "meaning": m} for n, v, m in rows], indent=2))
        return 0
    width = max(len(n) for n, _, _ in rows)
    for name, value, meaning in rows:
        print(f"{name:<{width}}  {value}\n{'':<{width}}  {meaning}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Find that conversation in multimodal chat logs.")
    parser.add_argument("--data-dir", help="data directory (env TESSERA_DATA_DIR, default ./.tessera)")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz while the command runs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="index message events from a JSON-lines file ('-' for stdin)")
    p.add_argument("file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("query", help="answer a query, or a file of query jobs with --jobs")
    p.add_argument("text", nargs="*")
    p.add_argument("--jobs", help="JSON-lines file of query jobs; one result per line on stdout, in order")
    p.add_argument("--tenant")
    p.add_argument("--user")
    p.add_argument("--conversation")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--image", help="search by this image (URI), alone or with TEXT; needs TESSERA_IMAGE_MODEL")
    p.add_argument("--history", action="append", default=[], metavar="ROLE: TEXT",
                   help="an earlier turn of the search dialogue ('user: ...' or 'assistant: ...'), oldest first")
    p.add_argument("--reasoning", choices=("auto", "fast", "vlm"), default="auto",
                   help="vlm: the VLM chooses the turns (TESSERA_VLM_MODEL); fast: the CPU span selector")
    p.add_argument("--json", action="store_true", help="print the result record")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("demo", help="ingest the bundled sample chats and answer example queries")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="retrieval quality on a dataset")
    evsub = p.add_subparsers(dest="dataset", required=True)
    e = evsub.add_parser("locomo", help="LoCoMo-format JSON files in DIR")
    e.add_argument("dir")
    e.add_argument("--out", default=EVAL_OUT, help="where the JSON table goes")
    e.add_argument("--cross-validate", action="store_true",
                   help="leave-one-conversation-out check of the tuned search settings (results/locomo-cv.json)")
    e.add_argument("--one-conversation", action="store_true",
                   help="the long-chat stress: all conversations as one, sessions in time order")
    e.add_argument("--messy", action="store_true",
                   help="the messy-chat stress: a message a sentence, casual spelling, reactions between turns")
    e.add_argument("--typos", type=float, default=0.0, metavar="SHARE",
                   help="the messy-chat stress with SHARE of its words of four letters or more misspelt")
    e.add_argument("--screenshots", type=float, default=0.0, metavar="SHARE",
                   help="the screenshot stress: SHARE of the single-evidence turns sent as a picture of their text"
                        " (found through their words with TESSERA_OCR=1)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    e = evsub.add_parser("dialogue", help="rewriting, time filters and clarifying questions on LoCoMo-format DIR")
    e.add_argument("dir")
    e.add_argument("--out", default="results", help="folder for dialogue-eval.md and .json")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval_dialogue)

    from ops.bench.report import add_arguments

    p = sub.add_parser("bench", help="benchmark report (Markdown + PNG): ingest, encoders, query latency at scale")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    from ops.bench import soak

    p = sub.add_parser("soak", help="bounded load and soak run on a local stack: throughput, latency, memory")
    soak.add_arguments(p)
    p.set_defaults(func=soak.main)

    p = sub.add_parser("consume", help="run the Kafka consumers (messages and queries to Celery)")
    p.add_argument("--topics", default="messages,queries", help="messages, queries or both")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("worker", help="run one Celery worker process")
    p.add_argument("--queues", default="ingest,embed,query")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="prefork", help="prefork, or solo for the GPU reasoning worker")
    p.add_argument("--name", default="cpu")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("produce", help="publish message events or query jobs (JSON lines) to Kafka")
    p.add_argument("kind", choices=["messages", "queries"])
    p.add_argument("file")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("results", help="print query results from tessera.results")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0, help="stop after this many idle seconds")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("stack", help="run Redis, the broker, workers and the consumer on loopback")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("reindex", help="rebuild the vector and BM25 indexes from the conversation state (resumable)")
    p.add_argument("--reencode", action="store_true", help="encode every turn again (after an encoder change)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("optimize", help="rebuild the embedded stores' segments built by an earlier version")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("dead-letters", help="conversations parked after repeated indexing failures, or dead tasks")
    p.add_argument("action", choices=["list", "replay", "drop"])
    p.add_argument("--tenant")
    p.add_argument("--conversation")
    p.add_argument("--tasks", action="store_true", help="the Redis list of dead tasks instead of parked conversations")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("serve", help="the HTTP API (search, messages, deletes) and the search page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys of tessera serve: create (bound to one tenant), list, revoke")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="the key to revoke")
    p.add_argument("--tenant")
    p.add_argument("--name", help="what the key is for (shown by list)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("config", help="every setting (environment variable) with its value and meaning")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("delete", help="delete a conversation, or everything a user sent (forget me)")
    p.add_argument("--tenant", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--conversation")
    group.add_argument("--user")
    p.set_defaults(func=cmd_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)
    try:
        config = Config.from_env(args.data_dir)
    except ConfigError as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return 2
    if args.command not in ("stack", "config"):
        use_stack_environment(args.data_dir)
    if args.metrics_port:
        from ops.runtime.telemetry import serve

        serve(args.metrics_port, host=config.metrics_host)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
