"""The one error map (p2pchat_common.errors): what a handler raises becomes a status at the edge,
for unary and streaming methods alike, and malformed requests are refused before a handler runs.
A tiny real grpc.aio server on port 0 (a hand-written service of StringValues), a real channel."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from p2pchat_common.errors import (
    InvalidArgument,
    NotFound,
    RemoteError,
    Unavailable,
    add_service,
    from_rpc_error,
    map_errors,
)
from tests.support.loop_thread import LoopThread

Context = grpc.aio.ServicerContext[Any, Any]
SECRET = "secret detail of the failure"


async def act(value: str, context: Context) -> StringValue:
    """What every method does with one request: `value` says how it fails, if it does."""
    if value == "not-found":
        raise NotFound("no such thing")
    if value == "boom":
        raise RuntimeError(SECRET)
    if value == "abort":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by the handler itself")
    return StringValue(value=f"echo {value}")


class Echo:
    """One method of each kind: a unary call, a server stream, a client stream, a bidi stream."""

    async def Say(self, request: StringValue, context: Context) -> StringValue:
        return await act(request.value, context)

    async def Repeat(self, request: StringValue, context: Context) -> AsyncIterator[StringValue]:
        yield StringValue(value="first")  # sent before the failure, which ends the stream
        yield await act(request.value, context)

    async def Join(self, requests: AsyncIterator[StringValue], context: Context) -> StringValue:
        values = [request.value async for request in requests]
        await act(values[-1] if values else "", context)
        return StringValue(value="+".join(values))

    async def Chat(
        self, requests: AsyncIterator[StringValue], context: Context
    ) -> AsyncIterator[StringValue]:
        async for request in requests:
            yield await act(request.value, context)


def adder(service: str) -> Callable[[Any, Any], None]:
    """An `add_*Servicer_to_server` for Echo as service `service`, shaped like grpcio-tools'."""

    def add_echo_to_server(servicer: Echo, server: Any) -> None:
        kw: dict[str, Any] = {
            "request_deserializer": StringValue.FromString,
            "response_serializer": StringValue.SerializeToString,
        }
        handlers: dict[str, Any] = {
            "Say": grpc.unary_unary_rpc_method_handler(servicer.Say, **kw),
            "Repeat": grpc.unary_stream_rpc_method_handler(servicer.Repeat, **kw),
            "Join": grpc.stream_unary_rpc_method_handler(servicer.Join, **kw),
            "Chat": grpc.stream_stream_rpc_method_handler(servicer.Chat, **kw),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)

    return add_echo_to_server


@pytest.fixture(scope="module")
def channel(loop_thread: LoopThread) -> Iterator[grpc.Channel]:
    """`test.Echo` with every string checked, `test.Lax` with check_strings=False."""

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_service(server, adder("test.Echo"), Echo())
        add_service(server, adder("test.Lax"), Echo(), check_strings=False)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        loop_thread.run(server.stop(0))


def method(channel: grpc.Channel, kind: str, name: str, service: str = "test.Echo") -> Any:
    """A callable for `/service/name` of `kind` ("unary_unary", ...), StringValue both ways."""
    factory = getattr(channel, kind)
    return factory(
        f"/{service}/{name}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def say(channel: grpc.Channel, value: str, service: str = "test.Echo") -> StringValue:
    reply: StringValue = method(channel, "unary_unary", "Say", service)(
        StringValue(value=value), timeout=10
    )
    return reply


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


def unhandled_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "p2pchat_common.errors" and r.levelno == logging.ERROR and r.exc_info
    ]


def test_a_handler_that_succeeds_answers_normally(channel: grpc.Channel) -> None:
    assert say(channel, "hi").value == "echo hi"


def test_a_domain_error_becomes_its_status_with_its_message(channel: grpc.Channel) -> None:
    assert status_of(lambda: say(channel, "not-found")) == (
        grpc.StatusCode.NOT_FOUND,
        "no such thing",
    )


def test_an_unexpected_exception_is_internal_with_a_generic_message_and_a_logged_traceback(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="p2pchat_common.errors"):
        code, details = status_of(lambda: say(channel, "boom"))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")
    assert SECRET not in details
    [record] = unhandled_logged(caplog)
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == SECRET


def test_an_abort_by_the_handler_itself_keeps_its_status_and_logs_nothing(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="p2pchat_common.errors"):
        assert status_of(lambda: say(channel, "abort")) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "refused by the handler itself",
        )
    assert unhandled_logged(caplog) == []


@pytest.mark.parametrize("service", ["test.Echo", "test.Lax"])
def test_an_undecodable_request_is_invalid_argument_before_the_handler_runs(
    channel: grpc.Channel, service: str
) -> None:
    raw: Any = channel.unary_unary(f"/{service}/Say")  # bytes as they are: bad UTF-8 in a string
    code, details = status_of(lambda: raw(b"\x0a\x02\xff\xfe", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("malformed request")


def test_a_control_character_in_a_string_field_is_refused_with_the_field_named(
    channel: grpc.Channel,
) -> None:
    code, details = status_of(lambda: say(channel, "bell\x07"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("value ")


def test_without_check_strings_a_control_character_reaches_the_handler(
    channel: grpc.Channel,
) -> None:
    assert say(channel, "bell\x07", service="test.Lax").value == "echo bell\x07"


def test_a_server_stream_ends_with_the_mapped_status_after_what_it_sent(
    channel: grpc.Channel,
) -> None:
    replies = method(channel, "unary_stream", "Repeat")(StringValue(value="not-found"), timeout=10)
    assert next(replies).value == "first"
    code, details = status_of(lambda: next(replies))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "no such thing")


def test_a_server_stream_with_a_malformed_request_is_refused_before_it_sends_anything(
    channel: grpc.Channel,
) -> None:
    replies = method(channel, "unary_stream", "Repeat")(StringValue(value="\x1b[2J"), timeout=10)
    code, _ = status_of(lambda: next(replies))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_server_stream_that_fails_unexpectedly_is_internal(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    replies = method(channel, "unary_stream", "Repeat")(StringValue(value="boom"), timeout=10)
    with caplog.at_level(logging.ERROR, logger="p2pchat_common.errors"):
        assert next(replies).value == "first"
        assert status_of(lambda: next(replies)) == (grpc.StatusCode.INTERNAL, "internal error")
    assert len(unhandled_logged(caplog)) == 1


def test_a_server_stream_keeps_the_status_of_an_abort_by_its_handler(
    channel: grpc.Channel,
) -> None:
    replies = method(channel, "unary_stream", "Repeat")(StringValue(value="abort"), timeout=10)
    assert next(replies).value == "first"
    code, _ = status_of(lambda: next(replies))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_stream_is_answered_once_every_request_passed_the_checks(
    channel: grpc.Channel,
) -> None:
    join = method(channel, "stream_unary", "Join")
    requests = [StringValue(value=v) for v in ("a", "b", "c")]
    assert join(iter(requests), timeout=10).value == "a+b+c"


def test_a_malformed_message_in_a_client_stream_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    join = method(channel, "stream_unary", "Join")
    requests = [StringValue(value="fine"), StringValue(value="not\x00fine")]
    code, details = status_of(lambda: join(iter(requests), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("value ")


def test_a_client_stream_handler_that_raises_a_domain_error_gets_its_status(
    channel: grpc.Channel,
) -> None:
    join = method(channel, "stream_unary", "Join")
    code, _ = status_of(lambda: join(iter([StringValue(value="not-found")]), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_bidi_stream_answers_until_a_message_is_refused(channel: grpc.Channel) -> None:
    chat = method(channel, "stream_stream", "Chat")
    requests = [StringValue(value="one"), StringValue(value="tw\x1bo"), StringValue(value="3")]
    replies = chat(iter(requests), timeout=10)
    assert next(replies).value == "echo one"
    code, _ = status_of(lambda: next(replies))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bidi_stream_maps_a_domain_error_raised_mid_stream(channel: grpc.Channel) -> None:
    chat = method(channel, "stream_stream", "Chat")
    replies = chat(iter([StringValue(value="one"), StringValue(value="not-found")]), timeout=10)
    assert next(replies).value == "echo one"
    assert status_of(lambda: next(replies)) == (grpc.StatusCode.NOT_FOUND, "no such thing")


def test_add_service_refuses_an_adder_that_registers_nothing_by_name(
    loop_thread: LoopThread,
) -> None:
    def add_nothing_to_server(servicer: object, server: Any) -> None:
        server.add_generic_rpc_handlers(())

    async def build() -> None:
        server = grpc.aio.server()
        try:
            add_service(server, add_nothing_to_server, object())
        finally:
            await server.stop(0)

    with pytest.raises(RuntimeError, match="add_nothing_to_server registered no handlers"):
        loop_thread.run(build())


def test_map_errors_leaves_a_handler_without_a_behaviour_as_it_is() -> None:
    handler: Any = grpc.unary_unary_rpc_method_handler(None)  # type: ignore[arg-type]
    handler = handler._replace(unary_unary=None)
    assert map_errors(handler) is handler


def test_map_errors_passes_raw_bytes_on_when_a_handler_has_no_deserializer() -> None:
    async def behaviour(request: bytes, context: Context) -> bytes:
        return request

    handler = map_errors(grpc.unary_unary_rpc_method_handler(behaviour))
    assert handler.request_deserializer is None
    assert handler.unary_unary is not None


def test_an_internal_error_of_another_service_is_passed_on_as_its_failure(
    channel: grpc.Channel,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        say(channel, "boom")
    err = from_rpc_error(info.value, "the directory")
    assert isinstance(err, RemoteError)
    assert err.code == grpc.StatusCode.INTERNAL
    assert str(err) == "the directory failed: internal error"


def test_another_services_status_is_passed_on_with_its_code_and_details(
    channel: grpc.Channel,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        say(channel, "not-found")
    err = from_rpc_error(info.value, "the directory")
    assert (err.code, str(err)) == (grpc.StatusCode.NOT_FOUND, "no such thing")


def test_an_unreachable_service_is_unavailable_naming_it() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as chan:
        with pytest.raises(grpc.RpcError) as info:
            say(chan, "hi")
    err = from_rpc_error(info.value, "the directory")
    assert isinstance(err, Unavailable)
    assert str(err).startswith("the directory unreachable: ")


def test_an_rpc_error_without_a_status_counts_as_an_unknown_failure() -> None:
    err = from_rpc_error(grpc.RpcError(), "peer bob")
    assert err.code == grpc.StatusCode.INTERNAL
    assert str(err) == "peer bob failed: StatusCode.UNKNOWN"


def test_details_passed_on_from_another_service_are_escaped_and_cut() -> None:
    class Refusal(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self) -> str:
            return "bad \x1b[2J" + "x" * 1000

    err = from_rpc_error(Refusal(), "the directory")
    assert isinstance(err, RemoteError) and not isinstance(err, InvalidArgument)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\x1b" not in str(err) and "\\x1b" in str(err)
    assert len(str(err)) < 600
