"""The domain errors of p2pchat and the one place that maps them to gRPC status codes.

Layers below the servicers raise these; `add_service` wraps every handler so that they become
statuses at the edge and servicers stay free of try/except boilerplate. Anything else becomes
INTERNAL with the traceback logged and a generic message sent. The same wrapper refuses malformed
requests before a handler sees them: undecodable ones, and text with control characters in any
string field (p2pchat_common.text).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from p2pchat_common.text import control_refusal, shown

log = logging.getLogger(__name__)

REMOTE_DETAILS_MAX = 500  # characters of another service's error message passed on


class StartupError(Exception):
    """A service cannot start (port taken, database unreachable...): one line for the operator."""


class DomainError(Exception):
    """Base of every error a client may see; the message is shown to the client as it is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RateLimited(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DiskFull(DomainError):
    """The disk is full: what was being written was not (a transaction rolled back, a file left
    as it was)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(DomainError):
    """Over a documented size or count limit (e.g. too much in one peer frame)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class RemoteError(DomainError):
    """An error another service answered with, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def from_rpc_error(err: grpc.RpcError, service: str) -> DomainError:
    """The domain error for a failed call to another service (`service` names it in messages)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    # What the other side said, escaped and cut: it goes on into our own messages and logs.
    raw = (err.details() if hasattr(err, "details") else None) or str(code)
    details = shown(raw, REMOTE_DETAILS_MAX, quoted=False)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{service} unreachable: {details}")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return RemoteError(grpc.StatusCode.INTERNAL, f"{service} failed: {details}")
    return RemoteError(code, details)


class _Undecodable:
    """Stands in for a request that could not be parsed (e.g. a string field with bad UTF-8)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe_deserializer(
    deserialize: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(exc, DomainError):
        await context.abort(exc.code, str(exc))
    log.error("unhandled error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


_BAD_REQUEST = "malformed request: strings must be valid UTF-8 and fields well-formed"

_Check = Callable[[Any], str | None]


def _undecodable(request: Any) -> str | None:
    """Why a request is refused before its handler runs (it could not be parsed), or None."""
    return _BAD_REQUEST if isinstance(request, _Undecodable) else None


def _malformed(request: Any) -> str | None:
    """`_undecodable`, and a string field holding a control character (p2pchat_common.text)."""
    if isinstance(request, _Undecodable):
        return _BAD_REQUEST
    return control_refusal(request)


async def _iterate_checked(requests: AsyncIterator[Any], check: _Check) -> AsyncIterator[Any]:
    """A request stream that raises InvalidArgument on a refused message."""
    async for request in requests:
        refusal = check(request)
        if refusal is not None:
            raise InvalidArgument(refusal)
        yield request


async def _checked_request(
    request: Any, check: _Check, streaming: bool, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    """The request a handler gets: a stream checked message by message as it is read, or one
    message checked now (refused with INVALID_ARGUMENT before the handler runs)."""
    if streaming:
        return _iterate_checked(request, check)
    refusal = check(request)
    if refusal is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
    return request


def _wrap_unary_response(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    check: _Check,
    streaming_request: bool,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request = await _checked_request(request, check, streaming_request, context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return unary


def _wrap_streaming_response(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
    check: _Check,
    streaming_request: bool,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request = await _checked_request(request, check, streaming_request, context)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return streaming


def map_errors(
    handler: grpc.RpcMethodHandler[Any, Any], check_strings: bool = True
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with DomainError mapped to status codes, and malformed requests refused with
    INVALID_ARGUMENT before it runs: undecodable ones, and (with `check_strings`) any whose
    string fields hold control characters (p2pchat_common.text)."""
    # The typeshed stubs describe sync handlers; on an aio server they are coroutines.
    h: Any = handler
    check = _malformed if check_strings else _undecodable
    deserializer = _safe_deserializer(h.request_deserializer)
    serializer = h.response_serializer
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(h.unary_unary, check, False), deserializer, serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_streaming_response(h.unary_stream, check, False), deserializer, serializer
        )
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(h.stream_unary, check, True), deserializer, serializer
        )
    if h.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_streaming_response(h.stream_stream, check, True), deserializer, serializer
        )
    return handler


class _MappingRegistrar:
    """What a generated `add_*Servicer_to_server` sees instead of the server: it registers the
    service's handlers on the real server, each wrapped by `map_errors`."""

    def __init__(self, server: grpc.aio.Server, check_strings: bool) -> None:
        self._server = server
        self._check_strings = check_strings
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the same handlers arrive by name in add_registered_method_handlers."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {
            name: map_errors(handler, self._check_strings) for name, handler in handlers.items()
        }
        generic = grpc.method_handlers_generic_handler(service, wrapped)
        self._server.add_generic_rpc_handlers((generic,))
        self._server.add_registered_method_handlers(service, wrapped)
        self.registered.append(service)


def add_service(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    *,
    check_strings: bool = True,
) -> None:
    """Registers `servicer` through its generated `add_*Servicer_to_server` with the error map
    applied to every method once, here, rather than by an interceptor on every call (an aio
    interceptor costs a coroutine and new handler objects per call: ~15 % of a short call).

    Every string field of every request is checked for control characters unless
    `check_strings` is False: for a hot stream whose handler checks its fields itself (the
    peer link: delivery.Delivery)."""
    registrar = _MappingRegistrar(server, check_strings)
    add_to_server(servicer, registrar)
    if not registrar.registered:
        raise RuntimeError(f"{add_to_server.__name__} registered no handlers by name")
