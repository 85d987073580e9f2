"""No control characters in text that enters a service: the rule, and its check of a whole request.

Every text field of every request refuses C0 (U+0000-U+001F), DEL (U+007F) and C1 (U+0080-U+009F);
a message body (a field named `body`) may hold tab, newline and carriage return, nothing else.
`control_refusal(request)` applies the rule to every string field of a protobuf message,
through nested, repeated and map fields: it runs on every call (p2pchat_common.errors), so what
to look at is worked out once per message type. `shown(value)` is how a message echoes text
it was given (p2pchat_common.validation re-exports it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
BODY_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # all but \t \n \r
MULTILINE_FIELDS = frozenset({"body"})
# Passwords are checked only for NUL here: an account made before the rule may have a password
# with other control characters and must still log in. New ones are held to the rule by
# validation.validate_password at registration.
SECRET_FIELDS = frozenset({"password"})
_NUL = re.compile("\x00")

_Search = Callable[[str], object]


def shown(value: str, limit: int = 40, *, quoted: bool = True) -> str:
    """`value` as an error message or a log line may show it, whoever sent it: quoted (unless
    not `quoted`), cut to `limit` characters (with "…") so that a huge input cannot flood a
    log, a screen or a reply, and with every control and non-printable character escaped
    (\\x1b, \\u202e) so that it cannot drive a terminal or forge a log line. The one way to
    put client- or network-supplied text in a message."""
    text = repr(value if len(value) <= limit else value[:limit] + "…")
    return text if quoted else text[1:-1]


def control_message(field: str, multiline: bool = False) -> str:
    """What a refusal says about `field`."""
    if multiline:
        return f"{field} must not contain control characters other than tab and line breaks"
    return f"{field} must not contain control characters"


class _Plan:
    """What to check in one message type: its string fields, and the message fields (singular,
    repeated or map values) whose types hold strings somewhere."""

    __slots__ = ("empty", "maps", "messages", "strings")

    def __init__(self) -> None:
        self.strings: list[tuple[str, bool, _Search, str]] = []  # name, repeated, search, refusal
        self.messages: list[tuple[str, bool, _Plan]] = []  # name, repeated, plan
        # name, key search, value search, value plan, refusal of a key, refusal of a value
        self.maps: list[tuple[str, _Search | None, _Search | None, _Plan | None, str, str]] = []
        self.empty = True


_PLANS: dict[Any, _Plan] = {}


def _search(multiline: bool) -> _Search:
    return (BODY_CONTROL if multiline else CONTROL).search


def _holds_text(descriptor: Any, visiting: set[Any]) -> bool:
    if descriptor in visiting:  # a cycle adds no field not already looked at
        return False
    visiting.add(descriptor)
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return True
        if field.message_type is not None and _holds_text(field.message_type, visiting):
            return True
    return False


def _plan_for(descriptor: Any) -> _Plan:
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    plan = _PLANS[descriptor] = _Plan()  # registered first: recursive types end here
    for field in descriptor.fields:
        name = field.name
        multiline = name in MULTILINE_FIELDS
        if field.type == FieldDescriptor.TYPE_STRING:
            if name in SECRET_FIELDS:
                refusal = f"{name} must not contain NUL characters"
                plan.strings.append((name, field.is_repeated, _NUL.search, refusal))
                continue
            refusal = control_message(name, multiline)
            plan.strings.append((name, field.is_repeated, _search(multiline), refusal))
            continue
        sub = field.message_type
        if sub is None or not _holds_text(sub, set()):
            continue
        if sub.GetOptions().map_entry:
            key, value = sub.fields_by_name["key"], sub.fields_by_name["value"]
            key_search = _search(False) if key.type == FieldDescriptor.TYPE_STRING else None
            text_value = value.type == FieldDescriptor.TYPE_STRING
            value_search = _search(multiline) if text_value else None
            value_plan = _plan_for(value.message_type) if value.message_type is not None else None
            plan.maps.append(
                (
                    name,
                    key_search,
                    value_search,
                    value_plan,
                    control_message(f"{name} key"),
                    control_message(name, multiline),
                )
            )
        else:
            plan.messages.append((name, field.is_repeated, _plan_for(sub)))
    plan.empty = not (plan.strings or plan.messages or plan.maps)
    return plan


def control_refusal(message: Any) -> str | None:
    """Why `message` is refused (a string field holds a control character it may not hold,
    named by its path, e.g. "text.body ..."), or None when it is fine."""
    plan = _PLANS.get(message.DESCRIPTOR) or _plan_for(message.DESCRIPTOR)
    return None if plan.empty else _refusal(message, plan)


def _refusal(message: Any, plan: _Plan) -> str | None:
    # A printable string holds no control character (str.isprintable is several times faster
    # than the search, which is left for the rest: line breaks in a body, format characters).
    for name, repeated, search, refusal in plan.strings:
        value = getattr(message, name)
        if repeated:
            for item in value:
                if not item.isprintable() and search(item):
                    return refusal
        elif not value.isprintable() and search(value):
            return refusal
    for name, repeated, sub in plan.messages:
        if repeated:
            for item in getattr(message, name):
                found = _refusal(item, sub)
                if found is not None:
                    return f"{name}.{found}"
        elif message.HasField(name):
            found = _refusal(getattr(message, name), sub)
            if found is not None:
                return f"{name}.{found}"
    for name, key_search, value_search, value_plan, key_refusal, value_refusal in plan.maps:
        for key, value in getattr(message, name).items():
            if key_search is not None and key_search(key):
                return key_refusal
            if value_search is not None and value_search(value):
                return value_refusal
            if value_plan is not None:
                found = _refusal(value, value_plan)
                if found is not None:
                    return f"{name}.{found}"
    return None
