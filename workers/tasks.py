"""Thin tasks: decode a versioned record, call the engine, hand the result on."""

from __future__ import annotations

from ops.runtime.telemetry import record_ingest, record_result
from workers.app import CONFIG, PUBLISH_RETRY, app
from workers.runtime import AnsweringTask, TesseraTask, engine, log, reasoner, reasoner_alive

#: Conversations one embed task takes at most: bounds the transaction, keeps the encoder batch full.
EMBED_MAX_CONVERSATIONS = 64


@app.task(name="tessera.ingest", base=TesseraTask)
def ingest(records: list[dict]) -> dict:
    """Apply message events to the conversation state, then ask the embed stage to index them."""
    from schemas import parse_message

    report = engine().apply([parse_message(r) for r in records])
    record_ingest(report)
    if report.upserted or report.deleted:
        embed.apply_async(retry=True, retry_policy=PUBLISH_RETRY)
    return report.__dict__


@app.task(name="tessera.embed", base=TesseraTask)
def embed() -> dict:
    """Index whatever conversations are pending, however many ingest tasks marked them.

    Under load many ingest tasks mark conversations before one embed task runs, so the encoder sees
    full batches; embed tasks that find nothing pending return at once.
    """
    e = engine()
    # Turns a task encodes at most (``TESSERA_EMBED_MAX_TEXTS``; 1,024 take a few seconds on two cores): far
    # inside the time limit even on a busy machine, so a backlog of long conversations goes a slice per task.
    max_texts = CONFIG.embed_max_texts
    texts, uris = e.ingestor.pending_work(EMBED_MAX_CONVERSATIONS, max_texts)
    vectors = e.ingestor.encode_texts(texts) if texts else None
    # Images are fetched (short timeouts, concurrently) before the write lock is taken.
    images = e.ingestor.embed_images(uris)
    report = e.index_pending(vectors, EMBED_MAX_CONVERSATIONS, images, max_texts=max_texts)
    record_ingest(report)
    if report.deferred:
        # Work this task had no budget for (the rest of a long backlog): the next task starts now, not at
        # the next sweep. Marks set meanwhile have embed tasks of their own, queued by their ingest tasks.
        embed.apply_async(retry=True, retry_policy=PUBLISH_RETRY)
    return report.__dict__


@app.task(name="tessera.delete_conversation", base=TesseraTask)
def delete_conversation(conversation_id: str, tenant_id: str) -> dict:
    """Erase one conversation of one tenant; a delete never fans out across tenants."""
    return {"deleted": engine().delete_conversation(tenant_id, conversation_id).deleted, "tenant": tenant_id}


@app.task(name="tessera.query", base=AnsweringTask)
def query(record: dict) -> dict:
    """Answer one query job and publish the result, or hand its candidates to the ``reason`` queue."""
    from schemas import ReasonRequest, parse_query

    out = engine().answer(parse_query(record), vlm_available=reasoner_alive())
    if isinstance(out, ReasonRequest):
        reason.apply_async(args=[out.model_dump(mode="json", by_alias=True)], retry=True, retry_policy=PUBLISH_RETRY)
        return {"job_id": out.job.job_id, "handed_to": "reason", "candidates": len(out.candidates)}
    return _publish(out)


@app.task(name="tessera.reason", base=AnsweringTask)
def reason(record: dict) -> dict:
    """The VLM chooses the turns of the recalled candidates; if it cannot load or fails on this request,
    ``auto`` jobs get the CPU spans and ``vlm`` jobs an error result."""
    from indexer.query.reasoning import ReasoningUnavailable, span_answer
    from schemas import Result, parse_reason

    request = parse_reason(record)
    try:
        result = reasoner().answer(request)
    except (ReasoningUnavailable, OSError, ValueError, RuntimeError):
        # RuntimeError: CUDA out of memory and other torch failures of this one batch.
        log.exception("the VLM failed on job %s; %s", request.job.job_id,
                      "answering with an error" if request.job.reasoning == "vlm" else "answering with the CPU spans")
        if request.job.reasoning == "vlm":
            result = Result.failure(request.job.job_id, "reasoning_unavailable", "the VLM reasoning stage failed on this job")
        else:
            result = span_answer(request)
    return _publish(result)


def _publish(result) -> dict:
    from workers.results import publish

    result = result.capped()
    record_result(result)
    publish(result.job_id, result.to_json())
    return result.model_dump(mode="json", by_alias=True)
