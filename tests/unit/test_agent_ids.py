"""Message ids: ULIDs, unique and increasing within a process; what counts as a valid id."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from types import SimpleNamespace

import pytest

from p2pchat_agent import ids
from p2pchat_agent.ids import MAX_ID_LEN, new_message_id, valid_message_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _decode(ulid: str) -> int:
    value = 0
    for char in ulid:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_ten_thousand_ids_made_in_a_tight_loop_are_unique_and_strictly_increasing() -> None:
    made = [new_message_id() for _ in range(10_000)]

    assert len(set(made)) == len(made)
    assert all(a < b for a, b in pairwise(made))


def test_an_id_is_26_crockford_base32_chars_whose_timestamp_is_now() -> None:
    before = time.time_ns() // 1_000_000
    made = new_message_id()
    after = time.time_ns() // 1_000_000

    assert len(made) == 26
    assert set(made) <= set(CROCKFORD)
    assert valid_message_id(made)
    assert before <= _decode(made) >> 80 <= after + 1


def test_ids_made_by_many_threads_at_once_are_unique() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [new_message_id() for _ in range(1000)], range(8)))

    made = [i for batch in batches for i in batch]
    assert len(set(made)) == 8000
    for batch in batches:
        assert batch == sorted(batch)


def _freeze_clock(monkeypatch: pytest.MonkeyPatch, now_ns: int) -> None:
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: now_ns))


def test_ids_keep_increasing_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_message_id()
    _freeze_clock(monkeypatch, time.time_ns() - 60 * 1_000_000_000)

    later = [new_message_id() for _ in range(100)]

    made = [first, *later]
    assert all(a < b for a, b in pairwise(made))


def test_an_exhausted_random_part_moves_the_timestamp_one_ms_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now_ms = time.time_ns() // 1_000_000
    _freeze_clock(monkeypatch, now_ms * 1_000_000)
    monkeypatch.setattr(ids, "_last_ms", now_ms)
    monkeypatch.setattr(ids, "_last_random", (1 << 80) - 1)
    last = ids._encode((now_ms << 80) | ((1 << 80) - 1))

    made = new_message_id()

    assert made > last
    assert _decode(made) >> 80 == now_ms + 1


@pytest.mark.parametrize(
    "value",
    ["a", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "abc_DEF-123", "x" * MAX_ID_LEN, "-", "_"],
)
def test_valid_message_id_accepts_ascii_letters_digits_underscore_and_dash(value: str) -> None:
    assert valid_message_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "x" * (MAX_ID_LEN + 1), "a b", "a/b", "a.b", "é", "a\n", "\n", "a\x00", "١٢٣", "ＡＢ"],
)
def test_valid_message_id_rejects_empty_too_long_and_other_characters(value: str) -> None:
    assert not valid_message_id(value)
