"""Status codes and exceptions (mirror of ``convoy_status`` in convoy.h)."""

from __future__ import annotations

import enum
from typing import Dict, Optional, Type, Union


class Status(enum.IntEnum):
    """``convoy_status``: the result of a fallible C call. Values are stable."""

    OK = 0
    TIMEOUT = 1
    NULL_POINTER = 2
    INVALID_UTF8 = 3
    INVALID_ARGUMENT = 4
    MODEL_NOT_FOUND = 5
    CORRUPT_MODEL = 6
    UNSUPPORTED_MODEL = 7
    TOKENIZER_ERROR = 8
    TEMPLATE_ERROR = 9
    BUSY = 10
    PROMPT_TOO_LONG = 11
    UNKNOWN_REQUEST = 12
    ENGINE_FAILED = 13
    SHUT_DOWN = 14
    MLX_ERROR = 15
    PANIC = 16
    IO_ERROR = 17


def _status(value: int) -> Union[Status, int]:
    """The Status for ``value``, or the plain int for a code newer than these bindings."""
    try:
        return Status(value)
    except ValueError:
        return value


class LibraryError(RuntimeError):
    """libconvoy could not be found or loaded, or its ABI version is not the one these
    bindings were written for."""


class ConvoyError(Exception):
    """A convoy call failed.

    ``status`` is the :class:`Status` the C function returned (a plain ``int`` for a status
    newer than these bindings; ``None`` for :class:`RequestError`, a request that failed
    after submission), ``message`` the library's explanation
    (``convoy_last_error_message``). Each status has its own subclass (for example
    :class:`InvalidArgumentError`, :class:`ModelNotFoundError`), so both
    ``except ModelNotFoundError`` and ``except ConvoyError as e: if e.status == ...`` work.
    """

    def __init__(self, status: Optional[Union[Status, int]], message: str = "") -> None:
        self.status = _status(status) if status is not None else None
        self.message = message
        super().__init__(status, message)

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, Status) else str(self.status)
        return f"{name}: {self.message}" if self.message else name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.message!r})"


class NullPointerError(ConvoyError):
    """NULL_POINTER: a required pointer was NULL (a bug in these bindings)."""


class InvalidUtf8Error(ConvoyError, ValueError):
    """INVALID_UTF8: a string was not valid UTF-8."""


class InvalidArgumentError(ConvoyError, ValueError):
    """INVALID_ARGUMENT: an argument or parameter value is out of range."""


class ModelNotFoundError(ConvoyError):
    """MODEL_NOT_FOUND: the model path does not exist or cannot be read."""


class CorruptModelError(ConvoyError):
    """CORRUPT_MODEL: the model file is corrupt or truncated."""


class UnsupportedModelError(ConvoyError):
    """UNSUPPORTED_MODEL: the architecture or quantization is not supported."""


class TokenizerError(ConvoyError):
    """TOKENIZER_ERROR: the tokenizer failed or does not match the model."""


class TemplateError(ConvoyError):
    """TEMPLATE_ERROR: the chat template failed to render (or the model has none)."""


class BusyError(ConvoyError):
    """BUSY: the waiting queue (or the number of held requests) is full; retry later."""


class PromptTooLongError(ConvoyError):
    """PROMPT_TOO_LONG: the prompt does not fit in the context window."""


class UnknownRequestError(ConvoyError):
    """UNKNOWN_REQUEST: no live request has this id."""


class EngineFailedError(ConvoyError):
    """ENGINE_FAILED: the engine failed; close it."""


class ShutDownError(ConvoyError):
    """SHUT_DOWN: the engine is shutting down or has been closed."""


class MlxError(ConvoyError):
    """MLX_ERROR: MLX reported an error."""


class PanicError(ConvoyError):
    """PANIC: a panic was caught at the API boundary (a bug in convoy)."""


class IoError(ConvoyError):
    """IO_ERROR: an I/O error."""


class RequestError(ConvoyError):
    """A request failed after submission (its FINISHED event had reason ERROR).

    ``status`` is None; ``message`` is the event's error text; ``completion`` holds what was
    generated before the failure (a :class:`convoy.Completion`).
    """

    def __init__(self, message: str, request_id: int, completion=None) -> None:
        super().__init__(None, message)
        self.request_id = request_id
        self.completion = completion

    def __str__(self) -> str:
        return f"request {self.request_id} failed: {self.message}"


_BY_STATUS: Dict[Status, Type[ConvoyError]] = {
    Status.NULL_POINTER: NullPointerError,
    Status.INVALID_UTF8: InvalidUtf8Error,
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.MODEL_NOT_FOUND: ModelNotFoundError,
    Status.CORRUPT_MODEL: CorruptModelError,
    Status.UNSUPPORTED_MODEL: UnsupportedModelError,
    Status.TOKENIZER_ERROR: TokenizerError,
    Status.TEMPLATE_ERROR: TemplateError,
    Status.BUSY: BusyError,
    Status.PROMPT_TOO_LONG: PromptTooLongError,
    Status.UNKNOWN_REQUEST: UnknownRequestError,
    Status.ENGINE_FAILED: EngineFailedError,
    Status.SHUT_DOWN: ShutDownError,
    Status.MLX_ERROR: MlxError,
    Status.PANIC: PanicError,
    Status.IO_ERROR: IoError,
}


def error_for(status: int, message: str) -> ConvoyError:
    """The exception for a failed call: the subclass of :class:`ConvoyError` for ``status``."""
    cls = _BY_STATUS.get(_status(status), ConvoyError)  # type: ignore[arg-type]
    return cls(status, message)
