"""Finding and loading libconvoy, and ctypes mirrors of the structs and functions of
convoy.h (ABI version 1).

Every struct mirrors its C definition field for field, ``struct_size`` first (the test suite
compares sizes and offsets with the header through a C compiler). Structs are always
initialized with the library's ``*_init(ptr, ctypes.sizeof(...))`` functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any, Callable, List, Optional, Tuple

from ._errors import LibraryError, Status, error_for

#: The ABI version these bindings were written for (``CONVOY_ABI_VERSION`` of convoy.h).
ABI_VERSION = 1

# Enum types are uint32_t in the C ABI (`typedef uint32_t convoy_status;` etc.).
c_status = c_uint32

# enum convoy_event_kind
EVENT_KIND_TOKEN = 1
EVENT_KIND_FINISHED = 2

#: ``void (*convoy_log_callback)(void *user_data, const char *line)``
LOG_CALLBACK = CFUNCTYPE(None, c_void_p, c_char_p)


class EngineConfig(Structure):
    """``convoy_engine_config``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("mode", c_uint32),
        ("weights", c_uint32),
        ("max_batch_size", c_uint32),
        ("max_waiting", c_uint32),
        ("max_requests", c_uint32),
        ("max_context", c_uint32),
        ("prefill_chunk", c_uint32),
        ("log_callback", LOG_CALLBACK),
        ("log_user_data", c_void_p),
        ("max_kv_bytes", c_uint64),
        ("mlx_cache_limit_bytes", c_uint64),
        ("prefix_cache_bytes", c_uint64),
        ("prefix_cache_path", c_char_p),
    ]


class RequestParams(Structure):
    """``convoy_request_params``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("max_tokens", c_uint32),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repetition_penalty", c_float),
        ("presence_penalty", c_float),
        ("frequency_penalty", c_float),
        ("has_seed", c_bool),
        ("seed", c_uint64),
        ("ignore_eos", c_bool),
        ("stop_token_ids", POINTER(c_uint32)),
        ("n_stop_token_ids", c_size_t),
        ("stop_strings", POINTER(c_char_p)),
        ("n_stop_strings", c_size_t),
        ("logprobs", c_bool),
        ("top_logprobs", c_uint32),
        ("constraint_kind", c_uint32),
        ("constraint", c_char_p),
    ]


class RequestStatsStruct(Structure):
    """``convoy_request_stats``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("prompt_tokens", c_uint32),
        ("generated_tokens", c_uint32),
        ("time_to_first_token", c_double),
        ("queue_time", c_double),
        ("prompt_tokens_per_second", c_double),
        ("generation_tokens_per_second", c_double),
        ("total_latency", c_double),
        ("cached_tokens", c_uint32),
    ]


class EventStruct(Structure):
    """``convoy_event``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("kind", c_uint32),
        ("request_id", c_uint64),
        ("token", c_uint32),
        ("text", c_void_p),  # const char *, read with text_len (may hold U+FFFD for NULs)
        ("text_len", c_size_t),
        ("finish_reason", c_uint32),
        ("stats", POINTER(RequestStatsStruct)),
        ("error", c_char_p),
        ("has_logprobs", c_bool),
        ("logprob", c_float),
        ("top_tokens", POINTER(c_uint32)),
        ("top_logprobs", POINTER(c_float)),
        ("n_top", c_size_t),
    ]


class EngineStatsStruct(Structure):
    """``convoy_engine_stats``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("running", c_uint32),
        ("waiting", c_uint32),
        ("kv_tokens", c_uint64),
        ("steps", c_uint64),
        ("tokens_generated", c_uint64),
        ("requests_finished", c_uint64),
        ("step_seconds", c_double),
        ("mlx_seconds", c_double),
        ("eval_seconds", c_double),
        ("peak_memory_bytes", c_uint64),
        ("kv_bytes", c_uint64),
        ("requests_held", c_uint64),
        ("active_memory_bytes", c_uint64),
        ("cache_memory_bytes", c_uint64),
        ("prefilling", c_uint32),
        ("prefix_cache_hits", c_uint64),
        ("prefix_cache_hit_tokens", c_uint64),
        ("prefix_cache_bytes", c_uint64),
        ("prefix_cache_entries", c_uint64),
        ("prefix_cache_evictions", c_uint64),
    ]


class ModelInfoStruct(Structure):
    """``convoy_model_info``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("context_length", c_uint32),
        ("name", c_char_p),
        ("architecture", c_char_p),
        ("vocab_size", c_uint32),
        ("has_bos_token", c_bool),
        ("bos_token_id", c_uint32),
        ("eos_token_ids", POINTER(c_uint32)),
        ("n_eos_token_ids", c_size_t),
        ("has_chat_template", c_bool),
        ("weight_dtype", c_char_p),
        ("backend", c_char_p),
        ("num_layers", c_uint32),
        ("hidden_size", c_uint32),
        ("num_heads", c_uint32),
        ("num_kv_heads", c_uint32),
        ("max_context", c_uint32),
    ]


class ChatMessageStruct(Structure):
    """``convoy_chat_message``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("role", c_char_p),
        ("content", c_char_p),
    ]


class BatchRequestStruct(Structure):
    """``convoy_batch_request``"""

    _fields_ = [
        ("struct_size", c_uint32),
        ("text", c_char_p),
        ("tokens", POINTER(c_uint32)),
        ("n_tokens", c_size_t),
        ("messages", POINTER(ChatMessageStruct)),
        ("n_messages", c_size_t),
        ("params", POINTER(RequestParams)),
    ]


#: The C name of each mirrored struct (used by the layout test).
C_NAMES = {
    EngineConfig: "convoy_engine_config",
    RequestParams: "convoy_request_params",
    RequestStatsStruct: "convoy_request_stats",
    EventStruct: "convoy_event",
    EngineStatsStruct: "convoy_engine_stats",
    ModelInfoStruct: "convoy_model_info",
    ChatMessageStruct: "convoy_chat_message",
    BatchRequestStruct: "convoy_batch_request",
}


def has_field(struct: Structure, name: str) -> bool:
    """``CONVOY_HAS_FIELD``: whether ``struct.struct_size`` covers field ``name``."""
    field = getattr(type(struct), name)
    return struct.struct_size >= field.offset + field.size


# name -> (restype, argtypes)
_PROTOTYPES = {
    "convoy_status_str": (c_char_p, [c_uint32]),
    "convoy_last_error_message": (c_size_t, [c_char_p, c_size_t]),
    "convoy_version": (c_char_p, []),
    "convoy_abi_version": (c_uint32, []),
    "convoy_backend": (c_char_p, []),
    "convoy_engine_config_init": (c_status, [POINTER(EngineConfig), c_size_t]),
    "convoy_request_params_init": (c_status, [POINTER(RequestParams), c_size_t]),
    "convoy_event_init": (c_status, [POINTER(EventStruct), c_size_t]),
    "convoy_engine_stats_init": (c_status, [POINTER(EngineStatsStruct), c_size_t]),
    "convoy_model_info_init": (c_status, [POINTER(ModelInfoStruct), c_size_t]),
    "convoy_chat_message_init": (
        c_status,
        [POINTER(ChatMessageStruct), c_size_t, c_char_p, c_char_p],
    ),
    "convoy_batch_request_init": (c_status, [POINTER(BatchRequestStruct), c_size_t]),
    "convoy_engine_submit_batch": (
        c_status,
        [c_void_p, POINTER(BatchRequestStruct), c_size_t, POINTER(c_uint64)],
    ),
    "convoy_engine_create": (c_status, [c_char_p, POINTER(EngineConfig), POINTER(c_void_p)]),
    "convoy_engine_destroy": (None, [c_void_p]),
    "convoy_engine_submit_text": (
        c_status,
        [c_void_p, c_char_p, POINTER(RequestParams), POINTER(c_uint64)],
    ),
    "convoy_engine_submit_tokens": (
        c_status,
        [c_void_p, POINTER(c_uint32), c_size_t, POINTER(RequestParams), POINTER(c_uint64)],
    ),
    "convoy_engine_submit_chat": (
        c_status,
        [c_void_p, POINTER(ChatMessageStruct), c_size_t, POINTER(RequestParams), POINTER(c_uint64)],
    ),
    "convoy_engine_poll": (c_status, [c_void_p, c_uint64, c_uint32, POINTER(EventStruct)]),
    "convoy_engine_poll_any": (c_status, [c_void_p, c_uint32, POINTER(EventStruct)]),
    "convoy_engine_cancel": (c_status, [c_void_p, c_uint64]),
    "convoy_engine_save_prefix_cache": (c_status, [c_void_p, c_char_p, POINTER(c_uint64)]),
    "convoy_engine_release": (c_status, [c_void_p, c_uint64]),
    "convoy_engine_get_stats": (c_status, [c_void_p, POINTER(EngineStatsStruct)]),
    "convoy_engine_model_info": (c_status, [c_void_p, POINTER(ModelInfoStruct)]),
    "convoy_engine_tokenize": (
        c_status,
        [c_void_p, c_char_p, c_bool, POINTER(c_uint32), c_size_t, POINTER(c_size_t)],
    ),
    "convoy_engine_detokenize": (
        c_status,
        [c_void_p, POINTER(c_uint32), c_size_t, c_bool, c_char_p, c_size_t, POINTER(c_size_t)],
    ),
    "convoy_engine_render_chat": (
        c_status,
        [
            c_void_p,
            POINTER(ChatMessageStruct),
            c_size_t,
            c_bool,
            c_char_p,
            c_size_t,
            POINTER(c_size_t),
        ],
    ),
    "convoy_engine_context_length": (c_uint32, [c_void_p]),
}


#: Functions added after ABI version 1.0: a library without them still loads (within one
#: ABI version functions are only ever added), and calling one raises LibraryError.
_ADDED = frozenset({"convoy_engine_save_prefix_cache"})


def _missing(path: str, name: str) -> Callable[..., Any]:
    def call(*_args: Any) -> Any:
        raise LibraryError(f"{path} lacks {name}: it is older than these bindings; update libconvoy")

    return call


def _lib_names() -> Tuple[str, ...]:
    if sys.platform == "darwin":
        return ("libconvoy.1.dylib", "libconvoy.dylib")
    return ("libconvoy.so.1", "libconvoy.so")


def _candidates() -> Tuple[List[str], List[str]]:
    """Paths (or names for the dynamic linker) to try, in order, and a description of each
    place looked at (for the error message)."""
    tried: List[str] = []
    paths: List[str] = []
    env = os.environ.get("CONVOY_LIBRARY")
    if env:
        # An explicit choice is never silently replaced by another library.
        return [env], [f"CONVOY_LIBRARY={env}"]
    tried.append("CONVOY_LIBRARY (not set)")
    pkg_config = shutil.which("pkg-config")
    if pkg_config:
        try:
            out = subprocess.run(
                [pkg_config, "--variable=libdir", "convoy"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            libdir = out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            libdir = ""
        if libdir:
            for name in _lib_names():
                path = os.path.join(libdir, name)
                if os.path.exists(path):
                    paths.append(path)
            tried.append(f"pkg-config libdir {libdir}")
        else:
            tried.append("pkg-config convoy (no convoy.pc on PKG_CONFIG_PATH)")
    else:
        tried.append("pkg-config (not installed)")
    found = ctypes.util.find_library("convoy")
    if found:
        paths.append(found)
    tried.append("ctypes.util.find_library('convoy')" + ("" if found else " (not found)"))
    return paths, tried


class Library:
    """The loaded libconvoy: ``cdll`` (a ctypes.CDLL, which releases the GIL during every
    call) with prototypes set, and ``path``."""

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self.cdll = cdll
        self.path = path
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                fn = getattr(cdll, name)
            except AttributeError:
                if name in _ADDED:
                    # A 1.x library older than the function: fail when it is used.
                    setattr(self, name[len("convoy_") :], _missing(path, name))
                    continue
                raise LibraryError(
                    f"{path} lacks {name}: it is older than these bindings (ABI version "
                    f"{ABI_VERSION}.0) or not libconvoy"
                ) from None
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name[len("convoy_") :], fn)

    def last_error(self) -> str:
        """``convoy_last_error_message`` of this thread (asks for the length first)."""
        n = self.last_error_message(None, 0)
        if n == 0:
            return ""
        buf = ctypes.create_string_buffer(n + 1)
        self.last_error_message(buf, n + 1)
        return buf.raw[:n].decode("utf-8", "replace")

    def check(self, status: int) -> None:
        """Raises the :class:`ConvoyError` for ``status`` unless it is OK."""
        if status != Status.OK:
            raise error_for(status, self.last_error())


_lock = threading.Lock()
_library: Optional[Library] = None


def load() -> Library:
    """Loads libconvoy once (thread-safe) and checks its ABI version.

    Lookup order: ``$CONVOY_LIBRARY`` (a path to libconvoy.so), then the ``libdir`` of
    ``pkg-config convoy`` (an installed tree: ``lib/libconvoy.so.1``), then
    ``ctypes.util.find_library("convoy")``. Raises :class:`LibraryError` if none loads or
    ``convoy_abi_version()`` is not :data:`ABI_VERSION`.
    """
    global _library
    with _lock:
        if _library is not None:
            return _library
        paths, tried = _candidates()
        errors: List[str] = []
        for path in paths:
            try:
                cdll = ctypes.CDLL(path)
            except OSError as e:
                errors.append(f"{path}: {e}")
                continue
            try:
                abi = cdll.convoy_abi_version
            except AttributeError:
                raise LibraryError(
                    f"{path} has no convoy_abi_version: not libconvoy, or one older than ABI "
                    f"version {ABI_VERSION}"
                ) from None
            abi.restype = c_uint32
            abi.argtypes = []
            version = abi()
            if version != ABI_VERSION:
                raise LibraryError(
                    f"{path} has ABI version {version}, these bindings need ABI version "
                    f"{ABI_VERSION} (libconvoy.so.{ABI_VERSION}); install matching bindings"
                )
            _library = Library(cdll, path)
            return _library
        detail = "; ".join(errors) if errors else "no library found"
        raise LibraryError(
            "cannot load libconvoy (" + detail + "). Looked at: " + ", ".join(tried) + ". Set "
            "CONVOY_LIBRARY to the path of libconvoy.so, or install convoy (`make install`) "
            "where pkg-config finds convoy.pc."
        )
