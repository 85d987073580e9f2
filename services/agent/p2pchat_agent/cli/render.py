"""How messages, contacts and statuses look on the terminal (and as JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2

STATUS_NAMES = {
    apb.MESSAGE_STATUS_PENDING: "pending",
    apb.MESSAGE_STATUS_DELIVERED: "delivered",
    apb.MESSAGE_STATUS_RECEIVED: "received",
}


def local_time(ts: Timestamp, with_date: bool = False) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    moment = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M:%S")


def message_line(m: apb.ChatMessage) -> str:
    """`[12:01:05] bob: hello` or `[12:01:06] you: hi  (pending)`."""
    outgoing = m.direction == apb.DIRECTION_OUTGOING
    who = "you" if outgoing else m.sender
    line = f"[{local_time(m.sent_at)}] {who}: {m.body}"
    if outgoing and m.status == apb.MESSAGE_STATUS_PENDING:
        line += "  (pending)"
    return line


def delivery_line(update: apb.DeliveryUpdate, body: str) -> str:
    preview = body if len(body) <= 40 else body[:39] + "…"
    return f"  ✓ delivered to {update.peer} at {local_time(update.delivered_at)}: {preview}"


def contact_rows(contacts: list[common_pb2.Contact]) -> list[str]:
    if not contacts:
        return ["(no contacts yet: add one with 2. Add contact)"]
    width = max(len(c.username) for c in contacts)
    rows = []
    for c in contacts:
        state = "online" if c.online else "offline"
        seen = "" if c.online else f", last seen {local_time(c.last_seen, with_date=True)}"
        address = c.address or "(no address)"
        rows.append(f"  {c.username:<{width}}  {address:<24}  {state}{seen}")
    return rows


def _iso(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime().isoformat() + "Z"


def message_json(m: apb.ChatMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "peer": m.peer,
        "direction": "outgoing" if m.direction == apb.DIRECTION_OUTGOING else "incoming",
        "sender": m.sender,
        "recipient": m.recipient,
        "body": m.body,
        "sent_at": _iso(m.sent_at),
        "received_at": _iso(m.received_at),
        "delivered_at": _iso(m.delivered_at),
        "status": STATUS_NAMES.get(m.status, "unknown"),
    }


def contact_json(c: common_pb2.Contact) -> dict[str, Any]:
    return {
        "username": c.username,
        "address": c.address,
        "pinned_address": c.pinned_address,
        "online": c.online,
        "last_seen": _iso(c.last_seen),
    }
