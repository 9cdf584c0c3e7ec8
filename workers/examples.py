"""Tasks the example flows call: ordinary Celery tasks that know nothing of the orchestrator.

They are registered with ``shared_task(name=...)``, so any worker that imports this
module (``ORCHESTRATOR_TASK_MODULES=workers.examples``) can run them.
"""

from __future__ import annotations

import hashlib

from celery import shared_task

from orchestrator import current_step


@shared_task(name="text.upper")
def upper(message: str) -> str:
    return message.upper()


@shared_task(name="text.reverse")
def reverse(message: str) -> str:
    return message[::-1]


@shared_task(name="text.count_spaces")
def count_spaces(message: str) -> int:
    return message.count(" ")


def _records(page: int, page_size: int) -> list[dict]:
    """A deterministic page of a fake CRM export."""
    start = (page - 1) * page_size
    return [
        {
            "id": i,
            "email": f"user{i}@example.com" if i % 7 else "not-an-email",
            "amount_cents": (i * 137) % 10_000,
        }
        for i in range(start, start + page_size)
    ]


@shared_task(name="etl.extract")
def extract(pages: int, page_size: int, flaky_failures: int = 0) -> dict:
    """Read every page of the source; fails its first ``flaky_failures`` attempts.

    Failing by attempt number (not by a counter in memory) makes the flakiness the
    same whichever worker process gets each retry.
    """
    ctx = current_step()
    attempt = ctx.attempt if ctx else 1
    if attempt <= flaky_failures:
        raise ConnectionError(f"source timed out (attempt {attempt} of a flaky source)")
    rows = [r for page in range(1, pages + 1) for r in _records(page, page_size)]
    return {"rows": rows, "pages": pages}


@shared_task(name="etl.validate")
def validate(rows: list[dict]) -> dict:
    good = [r for r in rows if "@" in r["email"]]
    return {"rows": good, "rejected": len(rows) - len(good)}


@shared_task(name="etl.transform")
def transform(rows: list[dict]) -> list[dict]:
    return [
        {"id": r["id"], "email": r["email"].lower(), "amount": r["amount_cents"] / 100}
        for r in rows
    ]


@shared_task(name="etl.load")
def load(rows: list[dict], table: str) -> dict:
    digest = hashlib.sha256(repr(sorted(r["id"] for r in rows)).encode()).hexdigest()[:12]
    return {
        "table": table,
        "count": len(rows),
        "checksum": digest,
        "total": round(sum(r["amount"] for r in rows), 2),
    }
