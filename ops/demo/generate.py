"""Writes the demo corpus: message events (JSON lines) and the PNG images they reference."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image, ImageDraw

from ops.demo.topics import CONVERSATIONS, TOPICS
from schemas import MESSAGE_SCHEMA

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
SESSION_SPACING = timedelta(days=4)
TURN_SPACING = timedelta(minutes=2)


def draw_image(path: Path, caption: str, colour: tuple[int, int, int]) -> None:
    """A small picture with the caption's colour and words, so the file is real and distinct."""
    image = Image.new("RGB", (320, 200), colour)
    draw = ImageDraw.Draw(image)
    for i in range(0, 200, 8):
        shade = tuple(max(0, min(255, c + (i - 100) // 3)) for c in colour)
        draw.rectangle([0, i, 320, i + 8], fill=shade)
    draw.rectangle([10, 150, 310, 190], fill=(255, 255, 255))
    draw.text((16, 162), caption[:48], fill=(0, 0, 0))
    image.save(path, format="PNG")


def generate(out_dir: str | Path) -> Path:
    """Write ``events.jsonl`` and ``images/`` under ``out_dir``; returns the events file."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for c_index, (tenant, conversation_id, speakers, private, sessions) in enumerate(CONVERSATIONS):
        participants = sorted(speakers) if private else None
        n = 0
        for s_index, topics in enumerate(sessions):
            at = START + c_index * timedelta(hours=3) + s_index * SESSION_SPACING
            for topic in topics:
                for k, line in enumerate(TOPICS[topic]):
                    n += 1
                    sender = speakers[k % 2]
                    event = {
                        "schema": MESSAGE_SCHEMA, "event_id": f"{conversation_id}-e{n}", "op": "upsert",
                        "tenant_id": tenant, "conversation_id": conversation_id, "message_id": f"m{n:03d}",
                        "sender_id": sender, "sender_name": sender.capitalize(), "sent_at": at.isoformat(),
                        "text": line if isinstance(line, str) else line[0], "images": [],
                    }
                    if participants:
                        event["participants"] = participants
                    if not isinstance(line, str):
                        _, caption, colour = line
                        path = images / f"{conversation_id}-m{n:03d}.png"
                        draw_image(path, caption, colour)
                        event["images"] = [{"uri": path.resolve().as_uri(), "caption": caption, "mime": "image/png"}]
                    lines.append(json.dumps(event))
                    at += TURN_SPACING
    events = out / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    return events
