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


# -- multi-system customer sync: CRM, billing and support, any of which may fail ---------


def _digest(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


@shared_task(name="crm.fetch_customer")
def crm_fetch_customer(customer_id: str) -> dict:
    n = _digest("crm", customer_id)
    return {
        "id": customer_id,
        "email": f"{customer_id}@example.com",
        "plan": ["free", "pro", "enterprise"][n % 3],
        "phone": f"+1555{n % 10_000:04d}",
    }


@shared_task(name="billing.fetch_account")
def billing_fetch_account(customer_id: str) -> dict:
    n = _digest("billing", customer_id)
    return {
        "customer": customer_id,
        "email": f"{customer_id}@example.com",
        "plan": ["free", "pro", "enterprise"][(n // 7) % 3],
        "balance": n % 500,
    }


@shared_task(name="support.fetch_contact")
def support_fetch_contact(customer_id: str, available: bool = True) -> dict:
    if not available:
        raise ConnectionError("support desk API is down (HTTP 503)")
    n = _digest("support", customer_id)
    return {
        "customer": customer_id,
        "phone": f"+1555{(n // 3) % 10_000:04d}",
        "open_tickets": n % 4,
    }


@shared_task(name="sync.detect_conflicts")
def detect_conflicts(crm: dict, billing: dict, support: dict | None) -> dict:
    """The CRM is the source of truth: list what billing and support disagree on."""
    billing_changes = {k: crm[k] for k in ("email", "plan") if billing.get(k) != crm[k]}
    support_changes = (
        {"phone": crm["phone"]} if support and support["phone"] != crm["phone"] else {}
    )
    return {
        "billing": billing_changes,
        "support": support_changes,
        "fields": sorted(set(billing_changes) | set(support_changes)),
        "support_reachable": support is not None,
    }


@shared_task(name="billing.update_account")
def billing_update_account(customer_id: str, changes: dict) -> dict:
    return {"system": "billing", "customer": customer_id, "updated": sorted(changes)}


@shared_task(name="support.update_contact")
def support_update_contact(customer_id: str, changes: dict) -> dict:
    return {"system": "support", "customer": customer_id, "updated": sorted(changes)}


@shared_task(name="sync.audit")
def audit(customer_id: str, conflicts: dict, support_status: str) -> dict:
    ctx = current_step()
    return {
        "customer": customer_id,
        "fields": conflicts["fields"],
        "support": support_status,
        "run": ctx.run_id if ctx else None,
    }


# -- travel booking saga: each booking has a compensation -------------------------------


@shared_task(name="travel.book_flight")
def book_flight(traveller: str, destination: str) -> dict:
    return {
        "booking": f"FL-{_digest('flight', traveller, destination) % 100_000:05d}",
        "to": destination,
    }


@shared_task(name="travel.book_hotel")
def book_hotel(traveller: str, destination: str, nights: int) -> dict:
    return {
        "booking": f"HT-{_digest('hotel', traveller, destination) % 100_000:05d}",
        "nights": nights,
    }


@shared_task(name="travel.book_car")
def book_car(traveller: str, destination: str) -> dict:
    return {"booking": f"CR-{_digest('car', traveller, destination) % 100_000:05d}"}


@shared_task(name="travel.cancel")
def cancel_booking(booking: str) -> dict:
    return {"cancelled": booking}


@shared_task(name="travel.charge")
def charge(card: str, amount: int) -> dict:
    if card == "declined":
        raise PermissionError(f"card declined for {amount} EUR")
    return {"charged": amount, "card": card[-4:]}


@shared_task(name="travel.notify")
def notify(traveller: str, message: str) -> str:
    return f"to {traveller}: {message}"


# -- expense approval and the nightly report ----------------------------------------------


@shared_task(name="expenses.submit")
def submit_expense(employee: str, amount: float, reason: str) -> dict:
    return {
        "expense": f"EXP-{_digest(employee, amount, reason) % 100_000:05d}",
        "employee": employee,
        "amount": amount,
    }


@shared_task(name="expenses.reimburse")
def reimburse(expense: str, employee: str, amount: float) -> dict:
    return {"expense": expense, "paid_to": employee, "amount": amount}


@shared_task(name="expenses.notify_rejected")
def notify_rejected(expense: str, employee: str, decisions: list) -> dict:
    who = [d["by"] for d in decisions if d and d["decision"] == "rejected"]
    return {"expense": expense, "to": employee, "rejected_by": who}


@shared_task(name="report.collect")
def collect_metrics(day: str | None = None) -> dict:
    import datetime as dt

    day = day or (dt.date.today() - dt.timedelta(days=1)).isoformat()
    n = _digest("metrics", day)
    return {"day": day, "orders": n % 1000, "revenue": round((n % 100_000) / 3, 2)}


@shared_task(name="report.render")
def render_report(metrics: dict) -> str:
    return (
        f"Daily report for {metrics['day']}: {metrics['orders']} orders, "
        f"{metrics['revenue']:.2f} EUR revenue"
    )


@shared_task(name="report.publish")
def publish_report(text: str, channel: str) -> dict:
    return {"channel": channel, "chars": len(text)}


# -- orders (flows/order-pricing.yaml): priced by the `pricing` HTTP service ------------


@shared_task(name="orders.confirm")
def confirm_order(order_id: str, total: float, available: int, quantity: int) -> dict:
    """Confirm an order that is in stock, or put it on back order."""
    status = "confirmed" if available >= quantity else "backordered"
    return {"order_id": order_id, "status": status, "total": total}
