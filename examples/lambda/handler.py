"""AWS Lambda: instrument at import (the cold start); clients live across warm invocations.

Deploy ``handler.handler`` with poolwatch, sqlalchemy and boto3 in the package (boto3 is in
the Python runtime already). Environment: ``TABLE_NAME`` (a DynamoDB table with a string
hash key ``pk``), optionally ``DATABASE_URL``; and an exporter, e.g.
``OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318`` for a collector extension (the ADOT
layer) running beside the function. Try it locally without AWS:

    python handler.py     # invokes the handler three times, as one execution environment

(that needs AWS credentials, a region, and ``AWS_ENDPOINT_URL`` pointing at e.g. moto).

Lambda imports this module once per execution environment — the cold start — and then
calls ``handler`` for every invocation that environment serves, warm. So poolwatch is
instrumented, and the engine and the boto3 client are created, at module level: warm
invocations reuse their pooled connections. Each invocation logs one JSON line showing it:
on the cold start ``instances_created`` and ``connects`` go from 0 to 1 and ``reused`` is 0;
on warm ones they stay 1 while ``checkouts`` and ``reused`` (checkouts served by a
connection the cold start opened) grow by one per invocation. A ``connects`` that grows
with warm invocations, ``reused`` staying 0, means connections are not reused (a client
built inside the handler shows as ``instances_created`` growing instead).

Metrics are flushed before the handler returns: between invocations Lambda freezes the
process, so a periodic exporter's thread may not run before the environment is reclaimed.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import boto3
import sqlalchemy as sa

import poolwatch

_POOLWATCH = poolwatch.instrument()  # settings from the environment: OTEL_*, POOLWATCH_*

engine = sa.create_engine(os.environ.get("DATABASE_URL", "sqlite:////tmp/lambda-example.db"))
dynamodb = boto3.client("dynamodb")
TABLE_NAME = os.environ.get("TABLE_NAME", "orders")

_invocations = 0


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _invocations
    _invocations += 1
    order_id = str(event.get("order_id") or uuid.uuid4())
    with engine.begin() as conn:  # one checkout per invocation
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO orders (id) VALUES (:id)"), {"id": order_id})
    dynamodb.put_item(TableName=TABLE_NAME, Item={"pk": {"S": order_id}})  # one checkout
    report = {
        "cold_start": _invocations == 1,
        "invocation": _invocations,
        "pools": {
            pool.name: {
                "kind": pool.kind,
                "instances_created": pool.instances_created,
                "connects": pool.connects,
                "checkouts": pool.checkouts,
                "reused": pool.reused,
            }
            for pool in poolwatch.pools()
        },
    }
    print(json.dumps({"poolwatch": report}))  # one line per invocation in CloudWatch Logs
    _POOLWATCH.meter_provider.force_flush(timeout_millis=2000)
    return {"order_id": order_id, **report}


if __name__ == "__main__":
    for number in range(3):
        handler({"order_id": f"local-{number}"}, None)
