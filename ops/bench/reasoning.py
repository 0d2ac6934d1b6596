"""Speed of the VLM reasoning stage: rerank the top 20 fragments of a query, per batch size.

``python -m ops.bench.reasoning --shape 7b`` builds a LLaVA-1.5-7B-shaped model with random weights
(speed does not depend on the weights), saves it, loads it through ``VlmReasoner`` (the production
loading code: bf16 on CUDA) and times ``answer`` on realistic candidates: fragments of 6-10 chat
turns, every other one with an image (576 image tokens each at 336 px). Reports, per batch size,
p50/p95 latency of one query's rerank and candidates per second, plus the GPU and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tqdm import tqdm

WORDS = ("glacier hike lake photo dinner recipe train ticket birthday cake meeting budget laptop battery rent flat "
         "concert guitar painting sunrise camping tent museum paris beach kayak wedding dress garden roses").split()


def candidates(n: int, image_dir: Path, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = random.Random(seed)
    t0 = datetime(2023, 5, 1, 12, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        turns = []
        for k in range(rng.randint(6, 10)):
            images = []
            if k % 2 == 1 and k < 4:
                path = image_dir / f"{i}-{k}.png"
                Image.new("RGB", (480, 360), tuple(rng.randrange(256) for _ in range(3))).save(path)
                images = [{"uri": f"file://{path}", "caption": " ".join(rng.sample(WORDS, 4))}]
            turns.append({"message_id": f"f{i}-m{k}", "speaker": rng.choice(["Anna", "Bob"]),
                          "sent_at": (t0 + timedelta(minutes=k)).isoformat(),
                          "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))), "images": images})
        out.append({"fragment_id": f"f{i}", "conversation_id": f"c{i % 5}", "start_at": t0.isoformat(),
                    "end_at": t0.isoformat(), "score": 1.0 - i / n, "span_message_ids": [f"f{i}-m0"], "turns": turns})
    return out


def run(shape: str, n_candidates: int, batch_sizes: list[int], repeats: int, out: Path | None) -> dict:
    import torch

    from indexer.images import ImagePolicy
    from indexer.query.reasoning import VlmReasoner
    from ops.bench import random_models
    from schemas import QUERY_SCHEMA, QueryJob, ReasonRequest

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="tessera-reason-bench-"))
    spec = random_models.LLAVA_7B if shape == "7b" else random_models.LLAVA_TINY
    t = time.perf_counter()
    path = random_models.llava(work / "model", shape=spec, vocab_size=32064 if shape == "7b" else None, device=device)
    built_s = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.empty_cache()
    job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": "bench", "tenant_id": "t", "user_id": "u",
                                   "query": "the photo of the glacier from the hike", "top_k": 5, "reasoning": "vlm"})
    request = ReasonRequest(job=job, rewritten_query=job.query,
                            candidates=candidates(n_candidates, work, seed=1))
    report = {"shape": shape, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "candidates": n_candidates, "build_and_save_s": round(built_s, 1), "rows": []}
    policy = ImagePolicy(file_roots=(work,))
    t = time.perf_counter()
    reasoner = VlmReasoner(path, device=device, policy=policy)
    reasoner.warm_up()
    report["load_s"] = round(time.perf_counter() - t, 1)
    prompt, images = reasoner.prompt(job.query, request.candidates[0], reasoner._images(request.candidates[0]))
    report["prompt_tokens_first_candidate"] = int(reasoner._processor(text=[prompt], images=images or None,
                                                                       return_tensors="pt")["input_ids"].shape[1])
    for batch in tqdm(batch_sizes, desc="batch sizes", file=sys.stderr):
        reasoner.batch_size = batch
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reasoner.answer(request)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            reasoner.answer(request)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        p50 = statistics.median(times)
        t = time.perf_counter()
        for i in range(0, n_candidates, batch):
            reasoner.inputs(job.query, request.candidates[i:i + batch])
        prep_s = time.perf_counter() - t
        report["rows"].append({
            "batch_size": batch, "p50_ms": round(p50 * 1000, 1),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))] * 1000, 1),
            "candidates_per_s": round(n_candidates / p50, 1), "cpu_prep_ms": round(prep_s * 1000, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None})
    best = max(report["rows"], key=lambda r: r["candidates_per_s"])
    report["best_batch_size"] = best["batch_size"]
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "reasoning-bench.json").write_text(json.dumps(report, indent=2))
        (out / "reasoning-bench.md").write_text(format_report(report) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [f"# VLM rerank of the top {report['candidates']} fragments: LLaVA {report['shape']} shapes, random weights,"
             f" on {report['device']}",
             f"model built+saved {report['build_and_save_s']} s, loaded {report['load_s']} s; first candidate's prompt "
             f"{report['prompt_tokens_first_candidate']} tokens", "",
             "| batch size | p50 ms | p95 ms | candidates/s | CPU prep ms (serial) | peak GPU GiB |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['p50_ms']} | {r['p95_ms']} | {r['candidates_per_s']} |"
                     f" {r['cpu_prep_ms']} | {r['peak_gpu_memory_gib']} |")
    lines.append(f"\nbest batch size: {report['best_batch_size']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 10, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    print(format_report(run(args.shape, args.candidates, args.batch_sizes, args.repeats, Path(args.out))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
