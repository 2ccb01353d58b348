//! The C ABI (prefix `convoy_`). Thin: argument checks, conversions and a panic boundary
//! around one call into the safe API in [`crate::engine`]. `include/convoy.h` is generated
//! from this module by cbindgen (see build.rs and cbindgen.toml).
//!
//! Conventions (after rustls-ffi and sqlite3):
//! - every fallible function returns a `convoy_status`; out-params are written only on
//!   `CONVOY_STATUS_OK`; details of the last failure on this thread are available from
//!   `convoy_last_error_message`;
//! - `const convoy_engine *` parameters may be used from many threads at once;
//!   `convoy_engine *` (destroy) needs exclusive access;
//! - no panic crosses the boundary: it becomes `CONVOY_STATUS_PANIC`.
//!
//! ABI v1 (see "ABI policy" in the header): every struct that crosses the boundary starts
//! with `uint32_t struct_size`. Structs the caller passes in are read through
//! [`read_sized`] (only the bytes the caller's size covers; later fields keep their
//! defaults); structs convoy fills are written through [`write_sized`] (at most the caller's
//! size, which is then set to the bytes written). Sizes count whole fields ([`AbiStruct`]);
//! any size from 4 (the size field alone) up is accepted, except for events, which must at
//! least hold `kind` and `request_id`. Fields are only ever appended, so a host
//! compiled against an older header keeps working with a newer library.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

mod engine;
mod types;

pub use engine::*;
pub use types::*;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// Status codes. Values are stable and never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_status {
    /// Success.
    Ok = 0,
    /// `convoy_engine_poll`: no event arrived within the timeout (not an error).
    Timeout = 1,
    /// A required pointer argument was NULL.
    NullPointer = 2,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 3,
    /// An argument or parameter value is out of range.
    InvalidArgument = 4,
    /// The model path does not exist or cannot be read.
    ModelNotFound = 5,
    /// The model file is corrupt or truncated.
    CorruptModel = 6,
    /// The model's architecture, quantization or tokenizer (e.g. a GGUF pre-tokenizer) is
    /// not supported.
    UnsupportedModel = 7,
    /// The tokenizer failed or does not match the model.
    TokenizerError = 8,
    /// The chat template failed to render.
    TemplateError = 9,
    /// The waiting queue is full; try again later.
    Busy = 10,
    /// The prompt does not fit in the context window.
    PromptTooLong = 11,
    /// No live request has this id (never submitted, or its terminal event was polled).
    UnknownRequest = 12,
    /// The engine failed (a panic or unrecoverable error on its thread); destroy it.
    EngineFailed = 13,
    /// The engine is shutting down.
    ShutDown = 14,
    /// MLX reported an error.
    MlxError = 15,
    /// A panic was caught at the API boundary (a bug in convoy).
    Panic = 16,
    /// An I/O error.
    IoError = 17,
}

impl From<&Error> for convoy_status {
    fn from(e: &Error) -> Self {
        match e {
            Error::ModelNotFound { .. } => Self::ModelNotFound,
            Error::CorruptModel { .. } | Error::BadWeights(_) => Self::CorruptModel,
            Error::UnsupportedArchitecture(_)
            | Error::UnsupportedQuantization(_)
            | Error::UnsupportedTokenizer(_) => Self::UnsupportedModel,
            Error::TokenizerMismatch(_) | Error::Tokenizer(_) => Self::TokenizerError,
            Error::Template(_) => Self::TemplateError,
            Error::Mlx(_) => Self::MlxError,
            Error::InvalidArgument(_) => Self::InvalidArgument,
            Error::Busy(_) => Self::Busy,
            Error::PromptTooLong { .. } => Self::PromptTooLong,
            Error::UnknownRequest(_) => Self::UnknownRequest,
            Error::EngineFailed(_) => Self::EngineFailed,
            Error::ShutDown => Self::ShutDown,
            Error::Io { .. } => Self::IoError,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// An FFI failure: a status plus the message stored for `convoy_last_error_message`.
pub(crate) struct Failure(convoy_status, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure((&e).into(), e.to_string())
    }
}

pub(crate) fn fail(status: convoy_status, message: impl Into<String>) -> Failure {
    Failure(status, message.into())
}

/// Runs `body` inside the panic boundary and turns its outcome into a status.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> convoy_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            convoy_status::Ok
        }
        Ok(Err(Failure(status, message))) => {
            set_last_error(&message);
            status
        }
        Err(_) => {
            set_last_error("internal panic caught at the convoy API boundary");
            convoy_status::Panic
        }
    }
}

/// The ABI major version (`CONVOY_ABI_VERSION`; the SONAME is `libconvoy.so.<this>`).
pub const ABI_VERSION: u32 = 1;

/// The smallest `struct_size` accepted: the size field alone.
pub(crate) const MIN_STRUCT_SIZE: usize = std::mem::size_of::<u32>();

/// A size-prefixed struct of the ABI: where each field ends, in declaration order. convoy
/// reads and writes whole fields only: a caller's `struct_size` is rounded down to the end of
/// the last field it covers, and the library's own size is the end of its last field (never
/// its tail padding, which a later release's appended field may occupy).
pub(crate) trait AbiStruct: Copy {
    const FIELD_ENDS: &'static [usize];
    /// The smallest `struct_size` accepted.
    const MIN: usize = MIN_STRUCT_SIZE;
    /// The bytes this library knows.
    const SIZE: usize = Self::FIELD_ENDS[Self::FIELD_ENDS.len() - 1];

    /// `size` rounded down to whole fields this library knows.
    fn whole_fields(size: usize) -> usize {
        Self::FIELD_ENDS
            .iter()
            .copied()
            .take_while(|&end| end <= size)
            .last()
            .unwrap_or(0)
    }
}

/// Implements [`AbiStruct`] from the struct's fields, listed in order with their types (both
/// checked at compile time: a missing, misspelt, mistyped or misordered field fails to build).
macro_rules! abi_struct {
    ($t:ty { $($f:ident: $ft:ty),+ $(,)? } $(min = $min:expr)?) => {
        impl $crate::ffi::AbiStruct for $t {
            const FIELD_ENDS: &'static [usize] =
                &[$(std::mem::offset_of!($t, $f) + std::mem::size_of::<$ft>()),+];
            $(const MIN: usize = $min;)?
        }
        const _: () = {
            #[allow(dead_code)]
            fn types(s: &$t) {
                $(let _: &$ft = &s.$f;)+
            }
            let ends: &[usize] = <$t as $crate::ffi::AbiStruct>::FIELD_ENDS;
            let sizes: &[usize] = &[$(std::mem::size_of::<$ft>()),+];
            let aligns: &[usize] = &[$(std::mem::align_of::<$ft>()),+];
            // Every field is listed: each starts where the previous one ends, rounded up to
            // its alignment, and the last one ends where the struct's tail padding begins.
            let mut i = 1;
            while i < ends.len() {
                let start = ends[i] - sizes[i];
                let expected = ends[i - 1].div_ceil(aligns[i]) * aligns[i];
                assert!(start == expected, "a field is missing or out of order");
                i += 1;
            }
            assert!(ends[0] == 4, "struct_size comes first");
            let size = std::mem::size_of::<$t>();
            let align = std::mem::align_of::<$t>();
            assert!(ends[ends.len() - 1].div_ceil(align) * align == size, "fields missing at the end");
        };
    };
}
pub(crate) use abi_struct;

/// Reads the leading `struct_size` of a caller's struct and checks it against `T::MIN`.
unsafe fn struct_size<T: AbiStruct>(ptr: *const T, name: &str) -> Result<usize, Failure> {
    let size = std::ptr::read_unaligned(ptr as *const u32) as usize;
    if size < T::MIN {
        return Err(fail(
            convoy_status::InvalidArgument,
            format!(
                "{name}->struct_size is {size}, below {}; set it with the struct's _init \
                 function or to sizeof",
                T::MIN
            ),
        ));
    }
    Ok(size)
}

/// Reads a size-prefixed struct the caller passes in: the whole fields its `struct_size`
/// covers, over `defaults`, so fields the caller's header lacks keep their defaults and fields
/// beyond this library's struct are ignored. `T` must be valid for any bytes (integers,
/// floats, raw pointers, optional function pointers; no `bool` or enum fields).
pub(crate) unsafe fn read_sized<T: AbiStruct>(
    ptr: *const T,
    defaults: T,
    name: &str,
) -> Result<T, Failure> {
    if ptr.is_null() {
        return Err(fail(convoy_status::NullPointer, format!("{name} is NULL")));
    }
    let n = T::whole_fields(struct_size(ptr, name)?.min(T::SIZE));
    let mut out = std::mem::MaybeUninit::new(defaults);
    std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr() as *mut u8, n);
    Ok(out.assume_init())
}

/// Checks a size-prefixed out-parameter and returns the bytes convoy may write to it (whole
/// fields). Only its `struct_size` is read.
pub(crate) unsafe fn out_sized<T: AbiStruct>(
    ptr: *mut T,
    name: &str,
) -> Result<(*mut T, usize), Failure> {
    if ptr.is_null() {
        return Err(fail(convoy_status::NullPointer, format!("{name} is NULL")));
    }
    let n = T::whole_fields(struct_size(ptr, name)?.min(T::SIZE));
    Ok((ptr, n))
}

/// Writes the first `n` bytes of `value` (from [`out_sized`]) to the caller's struct and sets
/// its `struct_size` to `n`.
pub(crate) unsafe fn write_sized<T: AbiStruct>((ptr, n): (*mut T, usize), value: T) {
    let value = std::mem::MaybeUninit::new(value);
    std::ptr::copy_nonoverlapping(value.as_ptr() as *const u8, ptr as *mut u8, n);
    std::ptr::write_unaligned(ptr as *mut u32, n as u32);
}

/// Fills a caller's struct of `size` bytes (its `sizeof`) with `value` for the `_init`
/// functions: the whole fields this library knows, zeros beyond them, `struct_size = size`.
pub(crate) unsafe fn init_sized<T: AbiStruct>(
    ptr: *mut T,
    size: usize,
    value: T,
    name: &str,
) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(fail(convoy_status::NullPointer, format!("{name} is NULL")));
    }
    if size < T::MIN || size > u32::MAX as usize {
        return Err(fail(
            convoy_status::InvalidArgument,
            format!("struct_size {size} for {name} is not a size of this struct; pass sizeof"),
        ));
    }
    let n = T::whole_fields(size.min(T::SIZE));
    let value = std::mem::MaybeUninit::new(value);
    std::ptr::copy_nonoverlapping(value.as_ptr() as *const u8, ptr as *mut u8, n);
    std::ptr::write_bytes((ptr as *mut u8).add(n), 0, size - n);
    std::ptr::write_unaligned(ptr as *mut u32, size as u32);
    Ok(())
}

/// Copies `bytes` into a caller's buffer snprintf-style: at most `len - 1` bytes and a NUL
/// (nothing when `len` is 0; `buf` may then be NULL). Returns the full length.
pub(crate) unsafe fn copy_out_str(
    bytes: &[u8],
    buf: *mut c_char,
    len: usize,
    name: &str,
) -> Result<usize, Failure> {
    if len > 0 {
        if buf.is_null() {
            return Err(fail(
                convoy_status::NullPointer,
                format!("{name} is NULL but its length is {len}"),
            ));
        }
        let n = bytes.len().min(len - 1);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
    Ok(bytes.len())
}

/// Dereferences a pointer argument or fails with `NullPointer` naming it.
pub(crate) unsafe fn arg<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, Failure> {
    ptr.as_ref()
        .ok_or_else(|| fail(convoy_status::NullPointer, format!("{name} is NULL")))
}

/// Checks an out-parameter: non-NULL. It is only ever written (`ptr.write`), never read or
/// turned into a reference, since the caller's memory may be uninitialised.
pub(crate) fn out_arg<T>(ptr: *mut T, name: &str) -> Result<*mut T, Failure> {
    if ptr.is_null() {
        Err(fail(convoy_status::NullPointer, format!("{name} is NULL")))
    } else {
        Ok(ptr)
    }
}

/// Checks that an array argument of `len` elements of `T` can be addressed (non-NULL when
/// `len > 0`, a size that fits `isize`), without forming a reference to it: the memory may
/// be an uninitialised out-array or hold struct padding.
pub(crate) fn array_arg<T>(ptr: *const T, len: usize, name: &str) -> Result<(), Failure> {
    if len > 0 && ptr.is_null() {
        return Err(fail(
            convoy_status::NullPointer,
            format!("{name} is NULL but its length is {len}"),
        ));
    }
    if len > (isize::MAX as usize) / std::mem::size_of::<T>().max(1) {
        return Err(fail(
            convoy_status::InvalidArgument,
            format!("{name}: absurd length {len}"),
        ));
    }
    Ok(())
}

/// Borrows a NUL-terminated UTF-8 string argument.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(fail(convoy_status::NullPointer, format!("{name} is NULL")));
    }
    CStr::from_ptr(ptr).to_str().map_err(|e| {
        fail(
            convoy_status::InvalidUtf8,
            format!("{name} is not valid UTF-8: {e}"),
        )
    })
}

/// Borrows `len` elements at `ptr` (NULL allowed only when `len` is 0).
pub(crate) unsafe fn slice_arg<'a, T>(
    ptr: *const T,
    len: usize,
    name: &str,
) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    array_arg(ptr, len, name)?;
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// Static text for a status code (never NULL; unknown values give "unknown status").
#[no_mangle]
pub extern "C" fn convoy_status_str(status: u32) -> *const c_char {
    let s: &'static CStr = match status {
        0 => c"ok",
        1 => c"timed out waiting for an event",
        2 => c"a required pointer argument was NULL",
        3 => c"a string argument was not valid UTF-8",
        4 => c"invalid argument",
        5 => c"model not found",
        6 => c"model file is corrupt or truncated",
        7 => c"unsupported model architecture or quantization",
        8 => c"tokenizer error",
        9 => c"chat template error",
        10 => c"engine busy: the waiting queue is full",
        11 => c"prompt too long for the context window",
        12 => c"unknown request id",
        13 => c"engine failed",
        14 => c"engine is shut down",
        15 => c"MLX error",
        16 => c"internal panic caught at the API boundary",
        17 => c"I/O error",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// Copies the message of the last failed convoy call on this thread into `buf` (always
/// NUL-terminated when `len > 0`, truncated if needed) and returns the message's full length
/// in bytes, excluding the NUL, like `snprintf`. An empty message means the last call
/// succeeded. `buf` may be NULL when `len` is 0 (to ask for the length). Never fails.
#[no_mangle]
pub unsafe extern "C" fn convoy_last_error_message(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let msg = e.borrow();
            let bytes = msg.as_bytes();
            if !buf.is_null() && len > 0 {
                let n = bytes.len().min(len - 1);
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
            bytes.len()
        })
    })
    .unwrap_or(0)
}

/// The library version, e.g. "0.1.0" (static storage; equals `CONVOY_VERSION` in the header
/// the library was built with).
#[no_mangle]
pub extern "C" fn convoy_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI major version of the library, `CONVOY_ABI_VERSION` of the header it was built
/// with. A host checks at run time that it equals the `CONVOY_ABI_VERSION` it was compiled
/// against; within one ABI version structs and functions are only ever added.
#[no_mangle]
pub extern "C" fn convoy_abi_version() -> u32 {
    ABI_VERSION
}

/// The MLX backend compiled in: "cpu", "metal" or "cuda" (static storage).
#[no_mangle]
pub extern "C" fn convoy_backend() -> *const c_char {
    match crate::backend() {
        "metal" => c"metal".as_ptr(),
        "cuda" => c"cuda".as_ptr(),
        _ => c"cpu".as_ptr(),
    }
}
