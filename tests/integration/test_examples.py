"""Every flow in flows/ runs on real workers with the inputs the demo uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import RunFailed

pytestmark = pytest.mark.integration

FLOWS = Path(__file__).resolve().parents[2] / "flows"


@pytest.fixture(scope="module")
def deployed(client, worker):
    return {d.name for d in client.deploy(FLOWS)}


def test_every_example_is_covered(deployed):
    assert deployed == {"text", "etl", "customer-sync", "trip-booking"}


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
