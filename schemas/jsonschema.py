"""Generates the checked-in JSON Schema files; ``python -m schemas.jsonschema`` rewrites them."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.models import (
    MESSAGE_SCHEMA, QUERY_SCHEMA, REASON_SCHEMA, RESULT_SCHEMA, MessageEvent, QueryJob, ReasonRequest, Result,
)

SCHEMA_DIR = Path(__file__).parent / "json"
MODELS = {MESSAGE_SCHEMA: MessageEvent, QUERY_SCHEMA: QueryJob, RESULT_SCHEMA: Result, REASON_SCHEMA: ReasonRequest}


def render() -> dict[str, str]:
    """File name -> JSON text for every contract."""
    out = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = name
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for file_name, text in render().items():
        (SCHEMA_DIR / file_name).write_text(text)
        print(SCHEMA_DIR / file_name)


if __name__ == "__main__":
    main()
