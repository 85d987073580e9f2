"""Dialer.close: a stop never waits without end for a dialler that does not end."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest

from p2pchat_agent import dialer as dialer_module
from p2pchat_agent.dialer import Dialer, Target


class _Directory:
    """Where bob is, as the directory's Lookup answers it."""

    async def lookup(self, peer: str) -> Any:
        contact = SimpleNamespace(address="127.0.0.1:9", online=True)
        return SimpleNamespace(contact=contact, public_key_sha256="")


def test_close_goes_on_without_a_dialler_that_ignores_its_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dialer_module, "CLOSE_WAIT", 0.3)

    async def scenario() -> float:
        linked = asyncio.Event()

        async def has_pending(_peer: str) -> bool:
            return True

        async def stubborn_link(_peer: str, _target: Target) -> None:
            linked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(30)  # a link that does not end when cancelled

        dialer = Dialer(_Directory(), 1.0, has_pending, lambda _p: False, stubborn_link)  # type: ignore[arg-type]
        dialer.ensure("bob")
        await asyncio.wait_for(linked.wait(), 5)
        started = time.monotonic()
        await dialer.close()
        took = time.monotonic() - started
        for task in asyncio.all_tasks():
            if task.get_name() == "dial-bob":
                task.cancel()  # the second cancellation ends it
        return took

    with caplog.at_level(logging.WARNING, logger="p2pchat_agent.dialer"):
        took = asyncio.run(scenario())
    assert took < 2.0
    assert "dial-bob did not end" in caplog.text
