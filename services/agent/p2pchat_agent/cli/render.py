"""How messages, contacts and statuses look on the terminal (and as JSON).

Text from the network (bodies, names, addresses, error details) reaches the terminal only through
`safe`: control characters and bidirectional overrides are shown as escapes, so that a message
cannot move the cursor, recolour the screen, reorder what is shown or forge a line of its own.
JSON output is escaped by json.dumps (which escapes C0; the agents refuse every other control
character where text enters).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2

STATUS_NAMES = {
    apb.MESSAGE_STATUS_PENDING: "pending",
    apb.MESSAGE_STATUS_DELIVERED: "delivered",
    apb.MESSAGE_STATUS_RECEIVED: "received",
    apb.MESSAGE_STATUS_RELAYED: "relayed",
}


# C0, DEL and C1 (Unicode category Cc), the bidirectional marks, embeddings, overrides and
# isolates, and the line and paragraph separators. Other format characters stay: emoji sequences
# (zero-width joiner, tag characters) need them and they cannot drive a terminal.
_BIDI_AND_SEPARATORS = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f" + _BIDI_AND_SEPARATORS + "]")
# In a body (multi-line) tab and newline stay.
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f" + _BIDI_AND_SEPARATORS + "]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
CONTINUATION = "    "  # what starts each further line of a multi-line body


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, multiline: bool = False) -> str:
    """`text` fit to print: control characters and bidi controls become visible escapes
    (`\\x1b`, `\\u202e`). With `multiline` (a message body), tabs and line breaks stay and every
    further line starts with CONTINUATION, so that no line of a body looks like a line of its own
    ("[12:00:00] bob: ..."); a lone carriage return is escaped, as it would overwrite the line."""
    if not multiline:
        return _UNSAFE_LINE.sub(_escape, text)
    text = _UNSAFE_IN_TEXT.sub(_escape, text.replace("\r\n", "\n"))
    return text.replace("\n", "\n" + CONTINUATION)


def local_time(ts: Timestamp, with_date: bool = False) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    moment = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M:%S")


def message_line(m: apb.ChatMessage) -> str:
    """`[12:01:05] bob: hello`, `[12:01:06] you: hi  (pending)` or `... (relayed)` (held by
    the directory's mailbox), with why it is held back when something holds it."""
    outgoing = m.direction == apb.DIRECTION_OUTGOING
    who = "you" if outgoing else safe(m.sender)
    line = f"[{local_time(m.sent_at)}] {who}: {safe(m.body, multiline=True)}"
    if outgoing and m.status == apb.MESSAGE_STATUS_PENDING:
        line += f"  (pending: {safe(m.status_reason)})" if m.status_reason else "  (pending)"
    elif outgoing and m.status == apb.MESSAGE_STATUS_RELAYED:
        line += "  (relayed)"
    return line


def delivery_line(update: apb.DeliveryUpdate, body: str) -> str:
    preview = safe(body if len(body) <= 40 else body[:39] + "…")
    if update.status == apb.MESSAGE_STATUS_RELAYED:
        return f"  ↪ relayed to {safe(update.peer)} (held by the mailbox): {preview}"
    when = local_time(update.delivered_at)
    return f"  ✓ delivered to {safe(update.peer)} at {when}: {preview}"


CONTACT_STATES = {
    common_pb2.CONTACT_STATE_ACCEPTED: "accepted",
    common_pb2.CONTACT_STATE_REQUESTED: "requested by you",
    common_pb2.CONTACT_STATE_AWAITING: "awaiting your answer",
    common_pb2.CONTACT_STATE_BLOCKED: "blocked",
}
STATE_WORDS = {  # for --json
    common_pb2.CONTACT_STATE_ACCEPTED: "accepted",
    common_pb2.CONTACT_STATE_REQUESTED: "requested",
    common_pb2.CONTACT_STATE_AWAITING: "awaiting",
    common_pb2.CONTACT_STATE_BLOCKED: "blocked",
}
POLICY_WORDS = {
    common_pb2.CONTACT_POLICY_ANYONE: "anyone",
    common_pb2.CONTACT_POLICY_INVITE: "invite",
    common_pb2.CONTACT_POLICY_NOBODY: "nobody",
}


def contact_rows(contacts: list[common_pb2.Contact]) -> list[str]:
    """One row per contact: name, address and presence when accepted, else the state."""
    if not contacts:
        return ["(no contacts yet: add one with 2. Add contact)"]
    names = [safe(c.username) for c in contacts]
    width = max(len(name) for name in names)
    rows = []
    for c, name in zip(contacts, names, strict=True):
        if c.state not in (common_pb2.CONTACT_STATE_ACCEPTED, common_pb2.CONTACT_STATE_UNSPECIFIED):
            note = f" ({safe(c.note)})" if c.note else ""
            rows.append(f"  {name:<{width}}  {CONTACT_STATES.get(c.state, 'unknown')}{note}")
            continue
        state = "online" if c.online else "offline"
        seen = "" if c.online else f", last seen {local_time(c.last_seen, with_date=True)}"
        address = safe(c.address) or "(no address)"
        rows.append(f"  {name:<{width}}  {address:<24}  {state}{seen}")
    return rows


def added_line(c: common_pb2.Contact) -> str:
    """What adding a contact did: accepted at once (they asked you), or a request sent."""
    name = safe(c.username)
    if c.state == common_pb2.CONTACT_STATE_REQUESTED:
        return f"added {name}: request sent; messages to them wait until they accept"
    address = safe(c.address) or "no address yet"
    return f"added {name} ({address}): an accepted contact"


def request_rows(requests: list[common_pb2.Contact]) -> list[str]:
    if not requests:
        return ["(no contact requests awaiting your answer)"]
    rows = []
    for i, r in enumerate(requests, 1):
        note = f": {safe(r.note)}" if r.note else ""
        when = local_time(r.requested_at, with_date=True)
        rows.append(f"  {i}. {safe(r.username)} (asked {when}){note}")
    return rows


def invite_json(i: common_pb2.Invite) -> dict[str, Any]:
    return {
        "id": i.id,
        "code": i.code or None,
        "created_at": _iso(i.created_at),
        "expires_at": _iso(i.expires_at),
        "uses_left": None if i.unlimited else i.uses_left,
        "revoked_at": _iso(i.revoked_at),
    }


def invite_row(i: common_pb2.Invite) -> str:
    expires = local_time(i.expires_at, with_date=True) if i.HasField("expires_at") else "never"
    uses = "any number of uses" if i.unlimited else f"{i.uses_left} use(s) left"
    revoked = ", REVOKED" if i.HasField("revoked_at") else ""
    return f"  {safe(i.id)}  expires {expires}, {uses}{revoked}"


def print_json(value: object) -> None:
    """What --json prints. ASCII only: every control, bidi or other unusual character arrives
    as a \\u escape."""
    print(json.dumps(value, ensure_ascii=True, indent=2))


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
        "status_reason": m.status_reason or None,
    }


def contact_json(c: common_pb2.Contact) -> dict[str, Any]:
    return {
        "username": c.username,
        "address": c.address,
        "pinned_address": c.pinned_address,
        "online": c.online,
        "last_seen": _iso(c.last_seen),
        "state": STATE_WORDS.get(c.state, "unknown"),
        "note": c.note or None,
        "requested_at": _iso(c.requested_at),
    }
