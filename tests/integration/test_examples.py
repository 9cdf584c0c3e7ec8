"""Every flow in flows/ runs on real workers with the inputs the demo uses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from orchestrator import RunFailed
from tests.support import wait_for
from workers.pricing import PricingService

pytestmark = pytest.mark.integration

FLOWS = Path(__file__).resolve().parents[2] / "flows"


PRICING_TOKEN = f"pricing-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def pricing():
    """The example pricing service flows/order-pricing.yaml calls."""
    svc = PricingService(PRICING_TOKEN).start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def orch_env(orch_env, pricing):
    """The workers' environment names the pricing service and holds its token."""
    return {
        **orch_env,
        "PRICING_URL": pricing.url,
        "PRICING_TOKEN": PRICING_TOKEN,
        "ORDERS_WEBHOOK_SECRET": "not-used-here",
    }


@pytest.fixture(scope="module")
def deployed(client, worker):
    return {d.name for d in client.deploy(FLOWS)}


def test_every_example_is_covered(deployed):
    assert deployed == {
        "text",
        "etl",
        "customer-sync",
        "trip-booking",
        "expense-approval",
        "nightly-report",
        "nightly-report-0200",
        "order-pricing",
        "pricing",
        "pricing-url",
        "pricing-token",
        "orders-webhook-secret",
        "price-new-orders",
    }


def test_order_pricing_calls_the_service_and_plain_http(client, deployed):
    out = client.trigger("order-pricing", {"order_id": "o-1", "sku": "widget", "quantity": 4}).wait(
        timeout=30
    )
    assert out == {"order_id": "o-1", "status": "confirmed", "total": 18.0}
    out = client.trigger("order-pricing", {"order_id": "o-2", "sku": "gizmo"}).wait(timeout=30)
    assert out["status"] == "backordered" and out["total"] == 120.0


def test_order_pricing_starts_from_an_event(client, deployed):
    client.publish("orders.created", {"id": "o-7", "sku": "gadget", "quantity": 2}, id="o-7")

    def started():
        runs = client.runs(flow="order-pricing", limit=50)
        return next((r for r in runs if r.inputs["order_id"] == "o-7"), None)

    wait_for(started, timeout=20, message="the event's run")
    run = started()
    assert run.wait(timeout=30) == {"order_id": "o-7", "status": "confirmed", "total": 39.98}


def test_customer_sync_with_every_system_up(client, deployed):
    run = client.trigger("customer-sync", {"customer_id": "c-42"})
    out = run.wait(timeout=30)
    assert out["support"] == "succeeded"
    assert out["audit"]["customer"] == "c-42" and out["audit"]["run"] == run.id
    steps = client.get(run.id).steps
    assert steps["crm"].status == steps["billing"].status == "succeeded"


def test_customer_sync_goes_on_when_support_is_down(client, deployed):
    run = client.trigger("customer-sync", {"customer_id": "c-42", "support_available": False})
    out = run.wait(timeout=30)
    assert out["support"] == "failed"
    steps = client.get(run.id).steps
    assert steps["support"].attempts == 2 and "HTTP 503" in steps["support"].error["message"]
    assert steps.get("update_support") is None or steps["update_support"].status == "skipped"


def test_trip_booking_succeeds(client, deployed):
    run = client.trigger(
        "trip-booking", {"traveller": "ada", "destination": "Lisbon", "card": "4242424242424242"}
    )
    out = run.wait(timeout=30)
    assert out["charged"] == 470 and out["flight"].startswith("FL-")


def test_trip_booking_declined_card_is_compensated(client, deployed):
    run = client.trigger(
        "trip-booking", {"traveller": "ada", "destination": "Lisbon", "card": "declined"}
    )
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    final = info.value.run
    assert final.status == "compensated"
    assert "card declined" in final.error["message"]
    steps = final.steps
    booked = sorted(("flight", "hotel", "car"), key=lambda s: steps[s].finished_at)
    undone = sorted(
        ("cancel_flight", "cancel_hotel", "cancel_car"), key=lambda s: steps[s].started_at
    )
    assert undone == [f"cancel_{s}" for s in reversed(booked)]
    assert steps["cancel_hotel"].output == {"cancelled": steps["hotel"].output["booking"]}
    assert steps["tell_traveller"].status == "succeeded"


def _decide_when_waiting(client, run_id, step, by, verdict="approve"):
    wait_for(
        lambda: (s := client.get(run_id).steps.get(step)) is not None and s.status == "waiting",
        timeout=20,
        message=f"{step} waits",
    )
    (client.approve if verdict == "approve" else client.reject)(run_id, step, by=by)


@pytest.mark.parametrize(
    "amount,approvers",
    [
        (300, [("manager_approval", "alice")]),
        (1200, [("manager_approval", "alice"), ("head_approval", "bob")]),
        (
            5000,
            [
                ("manager_approval", "alice"),
                ("head_approval", "bob"),
                ("finance_approval", "finance-team"),
            ],
        ),
    ],
)
def test_expense_approval_asks_whom_the_amount_requires(client, deployed, amount, approvers):
    run = client.trigger("expense-approval", {"employee": "eve", "amount": amount})
    for step, by in approvers:
        _decide_when_waiting(client, run.id, step, by)
    out = run.wait(timeout=30)
    assert out["result"] == {"expense": out["expense"], "paid_to": "eve", "amount": amount}
    steps = client.get(run.id).steps
    asked = {step for step, _ in approvers}
    for step in ("manager_approval", "head_approval", "finance_approval"):
        assert steps[step].status == ("succeeded" if step in asked else "skipped")


def test_expense_rejected_by_the_head_is_not_paid(client, deployed):
    run = client.trigger("expense-approval", {"employee": "eve", "amount": 800})
    _decide_when_waiting(client, run.id, "manager_approval", "alice")
    _decide_when_waiting(client, run.id, "head_approval", "bob", verdict="reject")
    out = run.wait(timeout=30)
    assert out["result"]["rejected_by"] == ["bob"]
    assert client.get(run.id).steps["reimburse"].status == "skipped"


def test_nightly_report_runs_and_is_scheduled(client, deployed):
    out = client.trigger("nightly-report", {"day": "2026-11-22"}).wait(timeout=30)
    assert out["report"].startswith("Daily report for 2026-11-22")
    (sched,) = [s for s in client.schedules() if s["name"] == "nightly-report-0200"]
    assert sched["flow"] == "nightly-report" and sched["catchup"] == "once"
    assert sched["next"] > 0
