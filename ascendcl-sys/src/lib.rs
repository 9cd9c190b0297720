//! Hand-written, run-time-loaded bindings to AscendCL (`libascendcl.so`).
//!
//! Nothing links against CANN: [`AscendCl::load`] opens the library with
//! `libloading`, so a build without CANN works and only the call fails, with
//! an error that says CANN is missing. See `README.md` for what is covered.
//!
//! The functions present in every CANN kvpool meets (init, devices, memory,
//! synchronous copies) are required: a library without one fails to load.
//! Streams, events, asynchronous copies and host registration are resolved
//! *optionally*: a CANN without one still loads, and only calling it fails,
//! with [`AclError::Unavailable`] naming the function and CANN.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `aclError`: 0 is success.
pub type AclErrorCode = c_int;

/// `ACL_SUCCESS`.
pub const ACL_SUCCESS: AclErrorCode = 0;

/// `ACL_ERROR_REPEAT_INITIALIZE`: `aclInit` was already called in this process
/// (by torch_npu, typically). Not a failure for a library that shares the process.
pub const ACL_ERROR_REPEAT_INITIALIZE: AclErrorCode = 100002;

/// `aclrtStream`: an opaque runtime handle.
pub type RawStream = *mut c_void;
/// `aclrtEvent`: an opaque runtime handle.
pub type RawEvent = *mut c_void;
/// `aclrtContext`: an opaque runtime handle.
pub type RawContext = *mut c_void;

/// `ACL_EVENT_SYNC`: an event other streams may wait on (`aclrtStreamWaitEvent`).
pub const ACL_EVENT_SYNC: u32 = 0x0000_0001;

/// `aclrtEventRecordedStatus::ACL_EVENT_RECORDED_STATUS_COMPLETE`.
pub const ACL_EVENT_RECORDED_STATUS_COMPLETE: c_int = 1;

/// `aclrtEventStatus::ACL_EVENT_STATUS_COMPLETE` (the older `aclrtQueryEvent`).
pub const ACL_EVENT_STATUS_COMPLETE: c_int = 0;

/// `aclrtHostRegisterType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRegisterType {
    /// `ACL_HOST_REGISTER_MAPPED`: page-locked and mapped for the device.
    Mapped = 0,
    /// `ACL_HOST_REGISTER_IOMEMORY`.
    IoMemory = 0x04,
    /// `ACL_HOST_REGISTER_READONLY`.
    ReadOnly = 0x08,
}

/// `aclrtMemcpyKind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemcpyKind {
    /// `ACL_MEMCPY_HOST_TO_HOST`.
    HostToHost = 0,
    /// `ACL_MEMCPY_HOST_TO_DEVICE`.
    HostToDevice = 1,
    /// `ACL_MEMCPY_DEVICE_TO_HOST`.
    DeviceToHost = 2,
    /// `ACL_MEMCPY_DEVICE_TO_DEVICE`.
    DeviceToDevice = 3,
}

/// `aclrtMemMallocPolicy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocPolicy {
    /// `ACL_MEM_MALLOC_HUGE_FIRST`: huge pages when available.
    HugeFirst = 0,
    /// `ACL_MEM_MALLOC_HUGE_ONLY`.
    HugeOnly = 1,
    /// `ACL_MEM_MALLOC_NORMAL_ONLY`.
    NormalOnly = 2,
}

/// Why the library could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No `libascendcl.so` was found.
    #[error(
        "CANN is not installed: libascendcl.so was not found (searched {}); install the \
         Ascend CANN toolkit and source its set_env.sh, or use Mooncake's \"protocol\": \"tcp\", \
         which needs no CANN",
        .searched.join(", ")
    )]
    NotInstalled {
        /// Every place tried, in order.
        searched: Vec<String>,
    },
    /// The library was found but lacks a function (a CANN too old or too new).
    #[error("{path} has no symbol {symbol}: an unsupported CANN version ({source})")]
    MissingSymbol {
        /// The library opened.
        path: String,
        /// The function looked for.
        symbol: &'static str,
        /// The loader's error.
        source: libloading::Error,
    },
}

/// A failed AscendCL call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// The call returned an `aclError` other than `ACL_SUCCESS`.
    #[error("{call} failed with aclError {code}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Failed {
        /// The function that failed.
        call: &'static str,
        /// Its `aclError`.
        code: AclErrorCode,
        /// `aclGetRecentErrMsg()`, when CANN had one.
        message: Option<String>,
    },
    /// The loaded CANN has no such function (one resolved optionally).
    #[error(
        "{call} is not in {path}: this CANN is too old for it (kvpool's NPU copies need \
         streams, events and aclrtMemcpyAsync; CANN 8.x has them); upgrade CANN, or use \
         Mooncake's \"protocol\": \"tcp\" with KV in host memory"
    )]
    Unavailable {
        /// The function looked for.
        call: &'static str,
        /// The library it was looked for in.
        path: String,
    },
}

impl AclError {
    /// The function that failed or is missing.
    pub fn call(&self) -> &'static str {
        match self {
            AclError::Failed { call, .. } | AclError::Unavailable { call, .. } => call,
        }
    }

    /// The `aclError`, for a call that ran.
    pub fn code(&self) -> Option<AclErrorCode> {
        match self {
            AclError::Failed { code, .. } => Some(*code),
            AclError::Unavailable { .. } => None,
        }
    }
}

/// A function resolved optionally: `None` when the library lacks it.
///
/// # Safety
/// `F` must be the function's C signature, and the pointer must not outlive `lib`.
unsafe fn optional<F: Copy>(lib: &libloading::Library, name: &'static str) -> Option<F> {
    let mut bytes = Vec::with_capacity(name.len() + 1);
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(0);
    // SAFETY: the caller vouches for the type; the symbol is copied out while
    // `lib` is borrowed.
    unsafe { lib.get::<F>(&bytes) }.ok().map(|s| *s)
}

/// The function, or [`AclError::Unavailable`] naming it.
fn need<F: Copy>(f: Option<F>, call: &'static str, path: &str) -> Result<F, AclError> {
    f.ok_or_else(|| AclError::Unavailable {
        call,
        path: path.to_owned(),
    })
}

type FnInit = unsafe extern "C" fn(*const c_char) -> AclErrorCode;
type FnVoid = unsafe extern "C" fn() -> AclErrorCode;
type FnDevice = unsafe extern "C" fn(i32) -> AclErrorCode;
type FnCount = unsafe extern "C" fn(*mut u32) -> AclErrorCode;
type FnMalloc = unsafe extern "C" fn(*mut *mut c_void, usize, MallocPolicy) -> AclErrorCode;
type FnFree = unsafe extern "C" fn(*mut c_void) -> AclErrorCode;
type FnMallocHost = unsafe extern "C" fn(*mut *mut c_void, usize) -> AclErrorCode;
type FnMemcpy =
    unsafe extern "C" fn(*mut c_void, usize, *const c_void, usize, MemcpyKind) -> AclErrorCode;
type FnErrMsg = unsafe extern "C" fn() -> *const c_char;
type FnGetDevice = unsafe extern "C" fn(*mut i32) -> AclErrorCode;
type FnGetContext = unsafe extern "C" fn(*mut RawContext) -> AclErrorCode;
type FnSetContext = unsafe extern "C" fn(RawContext) -> AclErrorCode;
type FnCreateStream = unsafe extern "C" fn(*mut RawStream) -> AclErrorCode;
type FnCreateStreamWithConfig = unsafe extern "C" fn(*mut RawStream, u32, u32) -> AclErrorCode;
type FnStream = unsafe extern "C" fn(RawStream) -> AclErrorCode;
type FnCreateEvent = unsafe extern "C" fn(*mut RawEvent) -> AclErrorCode;
type FnCreateEventWithFlag = unsafe extern "C" fn(*mut RawEvent, u32) -> AclErrorCode;
type FnEvent = unsafe extern "C" fn(RawEvent) -> AclErrorCode;
type FnRecordEvent = unsafe extern "C" fn(RawEvent, RawStream) -> AclErrorCode;
type FnStreamWaitEvent = unsafe extern "C" fn(RawStream, RawEvent) -> AclErrorCode;
type FnQueryEvent = unsafe extern "C" fn(RawEvent, *mut c_int) -> AclErrorCode;
type FnMemcpyAsync = unsafe extern "C" fn(
    *mut c_void,
    usize,
    *const c_void,
    usize,
    MemcpyKind,
    RawStream,
) -> AclErrorCode;
type FnHostRegister =
    unsafe extern "C" fn(*mut c_void, u64, HostRegisterType, *mut *mut c_void) -> AclErrorCode;

/// The loaded library and its functions.
pub struct AscendCl {
    path: String,
    init: FnInit,
    finalize: FnVoid,
    set_device: FnDevice,
    reset_device: FnDevice,
    device_count: FnCount,
    malloc: FnMalloc,
    free: FnFree,
    malloc_host: FnMallocHost,
    free_host: FnFree,
    memcpy: FnMemcpy,
    recent_error: Option<FnErrMsg>,
    opt: Optional,
    // Keeps the function pointers above valid; declared last so it is
    // dropped after them.
    _lib: libloading::Library,
}

/// Every function resolved optionally (see the crate doc), by name.
pub const OPTIONAL_FUNCTIONS: &[&str] = &[
    "aclrtGetDevice",
    "aclrtGetCurrentContext",
    "aclrtSetCurrentContext",
    "aclrtCreateStream",
    "aclrtCreateStreamWithConfig",
    "aclrtSynchronizeStream",
    "aclrtDestroyStream",
    "aclrtCreateEvent",
    "aclrtCreateEventWithFlag",
    "aclrtDestroyEvent",
    "aclrtRecordEvent",
    "aclrtStreamWaitEvent",
    "aclrtQueryEventStatus",
    "aclrtQueryEvent",
    "aclrtSynchronizeEvent",
    "aclrtMemcpyAsync",
    "aclrtHostRegister",
    "aclrtHostUnregister",
];

/// The functions resolved optionally (see the crate doc).
#[derive(Clone, Copy)]
struct Optional {
    get_device: Option<FnGetDevice>,
    get_current_context: Option<FnGetContext>,
    set_current_context: Option<FnSetContext>,
    create_stream: Option<FnCreateStream>,
    create_stream_with_config: Option<FnCreateStreamWithConfig>,
    synchronize_stream: Option<FnStream>,
    destroy_stream: Option<FnStream>,
    create_event: Option<FnCreateEvent>,
    create_event_with_flag: Option<FnCreateEventWithFlag>,
    destroy_event: Option<FnEvent>,
    record_event: Option<FnRecordEvent>,
    stream_wait_event: Option<FnStreamWaitEvent>,
    query_event_status: Option<FnQueryEvent>,
    query_event: Option<FnQueryEvent>,
    synchronize_event: Option<FnEvent>,
    memcpy_async: Option<FnMemcpyAsync>,
    host_register: Option<FnHostRegister>,
    host_unregister: Option<FnFree>,
}

impl Optional {
    /// # Safety
    /// Each type below is the function's signature in `acl_rt.h` (CANN runtime 1.16/1.17).
    unsafe fn resolve(lib: &libloading::Library) -> Self {
        // SAFETY: (every call) the caller vouches for the signatures; the
        // pointers are kept in `AscendCl` next to the library that owns them.
        unsafe {
            Optional {
                get_device: optional(lib, "aclrtGetDevice"),
                get_current_context: optional(lib, "aclrtGetCurrentContext"),
                set_current_context: optional(lib, "aclrtSetCurrentContext"),
                create_stream: optional(lib, "aclrtCreateStream"),
                create_stream_with_config: optional(lib, "aclrtCreateStreamWithConfig"),
                synchronize_stream: optional(lib, "aclrtSynchronizeStream"),
                destroy_stream: optional(lib, "aclrtDestroyStream"),
                create_event: optional(lib, "aclrtCreateEvent"),
                create_event_with_flag: optional(lib, "aclrtCreateEventWithFlag"),
                destroy_event: optional(lib, "aclrtDestroyEvent"),
                record_event: optional(lib, "aclrtRecordEvent"),
                stream_wait_event: optional(lib, "aclrtStreamWaitEvent"),
                query_event_status: optional(lib, "aclrtQueryEventStatus"),
                query_event: optional(lib, "aclrtQueryEvent"),
                synchronize_event: optional(lib, "aclrtSynchronizeEvent"),
                memcpy_async: optional(lib, "aclrtMemcpyAsync"),
                host_register: optional(lib, "aclrtHostRegister"),
                host_unregister: optional(lib, "aclrtHostUnregister"),
            }
        }
    }

    /// Every optional function this library lacks, by name.
    fn missing(&self) -> Vec<&'static str> {
        let present = [
            ("aclrtGetDevice", self.get_device.is_some()),
            ("aclrtGetCurrentContext", self.get_current_context.is_some()),
            ("aclrtSetCurrentContext", self.set_current_context.is_some()),
            ("aclrtCreateStream", self.create_stream.is_some()),
            (
                "aclrtCreateStreamWithConfig",
                self.create_stream_with_config.is_some(),
            ),
            ("aclrtSynchronizeStream", self.synchronize_stream.is_some()),
            ("aclrtDestroyStream", self.destroy_stream.is_some()),
            ("aclrtCreateEvent", self.create_event.is_some()),
            (
                "aclrtCreateEventWithFlag",
                self.create_event_with_flag.is_some(),
            ),
            ("aclrtDestroyEvent", self.destroy_event.is_some()),
            ("aclrtRecordEvent", self.record_event.is_some()),
            ("aclrtStreamWaitEvent", self.stream_wait_event.is_some()),
            ("aclrtQueryEventStatus", self.query_event_status.is_some()),
            ("aclrtQueryEvent", self.query_event.is_some()),
            ("aclrtSynchronizeEvent", self.synchronize_event.is_some()),
            ("aclrtMemcpyAsync", self.memcpy_async.is_some()),
            ("aclrtHostRegister", self.host_register.is_some()),
            ("aclrtHostUnregister", self.host_unregister.is_some()),
        ];
        present
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| name)
            .collect()
    }
}

impl fmt::Debug for AscendCl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AscendCl")
            .field("path", &self.path)
            .finish()
    }
}

/// Where `libascendcl.so` is looked for, in order.
pub fn search_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for var in ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"] {
        if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(dir).join("lib64/libascendcl.so"));
        }
    }
    out.push(PathBuf::from(
        "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so",
    ));
    // A bare name: the dynamic linker's own search (LD_LIBRARY_PATH, ld.so.cache).
    out.push(PathBuf::from("libascendcl.so"));
    out
}

impl AscendCl {
    /// Opens `libascendcl.so` and resolves every function.
    ///
    /// # Errors
    /// [`LoadError::NotInstalled`] without CANN; [`LoadError::MissingSymbol`]
    /// for a library without one of the functions.
    pub fn load() -> Result<Arc<Self>, LoadError> {
        let mut searched = Vec::new();
        for path in search_paths() {
            let shown = path.display().to_string();
            let explicit = path.components().count() > 1;
            if explicit && !path.exists() {
                searched.push(shown);
                continue;
            }
            // SAFETY: loading CANN runs its initialisers, which is what using
            // it requires; nothing else is called until the symbols resolve.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => return Self::resolve(lib, shown).map(Arc::new),
                Err(_) => searched.push(if explicit {
                    shown
                } else {
                    format!("{shown} on the linker path")
                }),
            }
        }
        Err(LoadError::NotInstalled { searched })
    }

    /// Opens the library at `path` (a CANN outside the usual places) and resolves it as
    /// [`load`](Self::load) does.
    ///
    /// # Errors
    /// [`LoadError::NotInstalled`] when it cannot be opened; [`LoadError::MissingSymbol`]
    /// for a library without one of the required functions.
    pub fn load_from(path: impl AsRef<Path>) -> Result<Arc<Self>, LoadError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        // SAFETY: as in `load`.
        match unsafe { libloading::Library::new(path) } {
            Ok(lib) => Self::resolve(lib, shown).map(Arc::new),
            Err(_) => Err(LoadError::NotInstalled {
                searched: vec![shown],
            }),
        }
    }

    fn resolve(lib: libloading::Library, path: String) -> Result<Self, LoadError> {
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the type is the function's signature in acl_rt.h /
                // acl.h; the pointer stays valid while `lib` is held.
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                *s.map_err(|source| LoadError::MissingSymbol {
                    path: path.clone(),
                    symbol: $name,
                    source,
                })?
            }};
        }
        let recent_error = {
            // SAFETY: as above; optional in older CANN.
            let s = unsafe { lib.get::<FnErrMsg>(b"aclGetRecentErrMsg\0") };
            s.ok().map(|s| *s)
        };
        // SAFETY: the types in `Optional` are the acl_rt.h signatures.
        let opt = unsafe { Optional::resolve(&lib) };
        Ok(AscendCl {
            init: sym!("aclInit"),
            finalize: sym!("aclFinalize"),
            set_device: sym!("aclrtSetDevice"),
            reset_device: sym!("aclrtResetDevice"),
            device_count: sym!("aclrtGetDeviceCount"),
            malloc: sym!("aclrtMalloc"),
            free: sym!("aclrtFree"),
            malloc_host: sym!("aclrtMallocHost"),
            free_host: sym!("aclrtFreeHost"),
            memcpy: sym!("aclrtMemcpy"),
            recent_error,
            opt,
            path,
            _lib: lib,
        })
    }

    /// The file the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self, call: &'static str, code: AclErrorCode) -> Result<(), AclError> {
        if code == ACL_SUCCESS {
            return Ok(());
        }
        let message = self.recent_error.and_then(|f| {
            // SAFETY: returns a NUL-terminated string owned by CANN, or null.
            let p = unsafe { f() };
            // SAFETY: non-null pointers from aclGetRecentErrMsg are C strings.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        });
        Err(AclError::Failed {
            call,
            code,
            message,
        })
    }

    /// Any other function of the library, for calls these bindings do not cover: `None`
    /// when it has none by that name.
    ///
    /// # Safety
    /// `F` is the function's C signature; calling it is as unsafe as the C function is.
    pub unsafe fn symbol<F: Copy>(&self, name: &'static str) -> Option<F> {
        // SAFETY: the caller vouches for the type; `self` keeps the library loaded as long
        // as the pointer is reachable through it.
        unsafe { optional(&self._lib, name) }
    }

    /// The optional functions (see the crate doc) this library lacks: empty on a current
    /// CANN.
    pub fn missing_optional(&self) -> Vec<&'static str> {
        self.opt.missing()
    }

    /// `aclInit(config)`: once per process, before any other call.
    pub fn init(&self, config: Option<&CStr>) -> Result<(), AclError> {
        let p = config.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: a valid C string or null, as aclInit accepts.
        self.check("aclInit", unsafe { (self.init)(p) })
    }

    /// `aclFinalize()`.
    pub fn finalize(&self) -> Result<(), AclError> {
        // SAFETY: no arguments.
        self.check("aclFinalize", unsafe { (self.finalize)() })
    }

    /// `aclrtGetDeviceCount`.
    pub fn device_count(&self) -> Result<u32, AclError> {
        let mut n = 0u32;
        // SAFETY: a valid out pointer.
        self.check("aclrtGetDeviceCount", unsafe {
            (self.device_count)(&mut n)
        })?;
        Ok(n)
    }

    /// `aclrtSetDevice`: binds the calling thread to `device`.
    pub fn set_device(&self, device: i32) -> Result<(), AclError> {
        // SAFETY: plain integer argument.
        self.check("aclrtSetDevice", unsafe { (self.set_device)(device) })
    }

    /// `aclrtResetDevice`.
    pub fn reset_device(&self, device: i32) -> Result<(), AclError> {
        // SAFETY: plain integer argument.
        self.check("aclrtResetDevice", unsafe { (self.reset_device)(device) })
    }

    /// `aclrtMalloc`: device memory, freed when the buffer drops.
    pub fn malloc(
        self: &Arc<Self>,
        len: usize,
        policy: MallocPolicy,
    ) -> Result<DeviceBuffer, AclError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        self.check("aclrtMalloc", unsafe { (self.malloc)(&mut p, len, policy) })?;
        Ok(DeviceBuffer {
            acl: self.clone(),
            ptr: p,
            len,
            host: false,
        })
    }

    /// `aclrtMallocHost`: page-locked host memory, freed when the buffer drops.
    pub fn malloc_host(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, AclError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        self.check("aclrtMallocHost", unsafe {
            (self.malloc_host)(&mut p, len)
        })?;
        Ok(DeviceBuffer {
            acl: self.clone(),
            ptr: p,
            len,
            host: true,
        })
    }

    /// Copies `src` into `dst` at `offset` (host to device).
    pub fn copy_to_device(
        &self,
        dst: &DeviceBuffer,
        offset: usize,
        src: &[u8],
    ) -> Result<(), AclError> {
        offset
            .checked_add(src.len())
            .filter(|&e| e <= dst.len)
            .ok_or(AclError::Failed {
                call: "aclrtMemcpy",
                code: -1,
                message: Some(format!(
                    "{} bytes at offset {offset} do not fit a {}-byte buffer",
                    src.len(),
                    dst.len
                )),
            })?;
        // SAFETY: the destination range is inside the allocation (checked),
        // the source is a valid slice.
        let code = unsafe {
            (self.memcpy)(
                dst.ptr.cast::<u8>().add(offset).cast(),
                dst.len - offset,
                src.as_ptr().cast(),
                src.len(),
                if dst.host {
                    MemcpyKind::HostToHost
                } else {
                    MemcpyKind::HostToDevice
                },
            )
        };
        self.check("aclrtMemcpy", code)
    }

    /// Copies `dst.len()` bytes at `offset` of `src` into `dst` (device to host).
    pub fn copy_to_host(
        &self,
        dst: &mut [u8],
        src: &DeviceBuffer,
        offset: usize,
    ) -> Result<(), AclError> {
        offset
            .checked_add(dst.len())
            .filter(|&e| e <= src.len)
            .ok_or(AclError::Failed {
                call: "aclrtMemcpy",
                code: -1,
                message: Some(format!(
                    "{} bytes at offset {offset} are outside a {}-byte buffer",
                    dst.len(),
                    src.len
                )),
            })?;
        // SAFETY: the source range is inside the allocation (checked), the
        // destination is a valid mutable slice.
        let code = unsafe {
            (self.memcpy)(
                dst.as_mut_ptr().cast(),
                dst.len(),
                src.ptr.cast::<u8>().add(offset).cast(),
                dst.len(),
                if src.host {
                    MemcpyKind::HostToHost
                } else {
                    MemcpyKind::DeviceToHost
                },
            )
        };
        self.check("aclrtMemcpy", code)
    }

    /// `aclInit(NULL)`, where a second call in the process (torch_npu made the first) is
    /// success: kvpool shares the process and never calls `aclFinalize`.
    pub fn init_shared(&self) -> Result<(), AclError> {
        // SAFETY: null is a valid config argument.
        let code = unsafe { (self.init)(std::ptr::null()) };
        if code == ACL_ERROR_REPEAT_INITIALIZE {
            return Ok(());
        }
        self.check("aclInit", code)
    }

    fn need<F: Copy>(&self, f: Option<F>, call: &'static str) -> Result<F, AclError> {
        need(f, call, &self.path)
    }

    /// `aclrtGetDevice`: the device bound to the calling thread. Fails (with CANN's
    /// "context is null" error) on a thread no device was set on.
    pub fn get_device(&self) -> Result<i32, AclError> {
        let f = self.need(self.opt.get_device, "aclrtGetDevice")?;
        let mut d = -1i32;
        // SAFETY: a valid out pointer.
        self.check("aclrtGetDevice", unsafe { f(&mut d) })?;
        Ok(d)
    }

    /// `aclrtGetCurrentContext`.
    pub fn current_context(&self) -> Result<RawContext, AclError> {
        let f = self.need(self.opt.get_current_context, "aclrtGetCurrentContext")?;
        let mut c = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        self.check("aclrtGetCurrentContext", unsafe { f(&mut c) })?;
        Ok(c)
    }

    /// `aclrtSetCurrentContext`.
    ///
    /// # Safety
    /// `context` is a live context of this process.
    pub unsafe fn set_current_context(&self, context: RawContext) -> Result<(), AclError> {
        let f = self.need(self.opt.set_current_context, "aclrtSetCurrentContext")?;
        // SAFETY: the caller vouches for the handle.
        self.check("aclrtSetCurrentContext", unsafe { f(context) })
    }

    /// `aclrtCreateStream`: a stream on the calling thread's device, destroyed on drop.
    pub fn create_stream(self: &Arc<Self>) -> Result<Stream, AclError> {
        let f = self.need(self.opt.create_stream, "aclrtCreateStream")?;
        self.need(self.opt.destroy_stream, "aclrtDestroyStream")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        self.check("aclrtCreateStream", unsafe { f(&mut raw) })?;
        Ok(Stream {
            acl: self.clone(),
            raw,
        })
    }

    /// `aclrtCreateStreamWithConfig(stream, priority, flag)`: `priority` 0 is the highest;
    /// `flag` is `ACL_STREAM_*` (0 for none).
    pub fn create_stream_with_config(
        self: &Arc<Self>,
        priority: u32,
        flag: u32,
    ) -> Result<Stream, AclError> {
        let f = self.need(
            self.opt.create_stream_with_config,
            "aclrtCreateStreamWithConfig",
        )?;
        self.need(self.opt.destroy_stream, "aclrtDestroyStream")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a valid out pointer; plain integers.
        self.check("aclrtCreateStreamWithConfig", unsafe {
            f(&mut raw, priority, flag)
        })?;
        Ok(Stream {
            acl: self.clone(),
            raw,
        })
    }

    /// An event other streams can wait on, destroyed on drop:
    /// `aclrtCreateEventWithFlag(ACL_EVENT_SYNC)` where the library has it (the flag
    /// `aclrtStreamWaitEvent` requires of flagged events), else `aclrtCreateEvent`.
    pub fn create_event(self: &Arc<Self>) -> Result<Event, AclError> {
        self.need(self.opt.destroy_event, "aclrtDestroyEvent")?;
        let mut raw = std::ptr::null_mut();
        if let Some(f) = self.opt.create_event_with_flag {
            // SAFETY: a valid out pointer and a flag from acl_rt.h.
            self.check("aclrtCreateEventWithFlag", unsafe {
                f(&mut raw, ACL_EVENT_SYNC)
            })?;
        } else {
            let f = self.need(self.opt.create_event, "aclrtCreateEvent")?;
            // SAFETY: a valid out pointer.
            self.check("aclrtCreateEvent", unsafe { f(&mut raw) })?;
        }
        Ok(Event {
            acl: self.clone(),
            raw,
        })
    }

    /// `aclrtStreamWaitEvent(stream, event)` on a stream kvpool does not own (torch_npu's
    /// `current_stream().npu_stream`): work queued on `stream` afterwards waits for the
    /// event's last record.
    ///
    /// # Safety
    /// `stream` is a live stream of the calling thread's device (0: the default stream).
    /// `event` stays alive until the wait has completed on the device.
    pub unsafe fn stream_wait_event_raw(
        &self,
        stream: RawStream,
        event: &Event,
    ) -> Result<(), AclError> {
        let f = self.need(self.opt.stream_wait_event, "aclrtStreamWaitEvent")?;
        // SAFETY: the caller vouches for `stream`; `event` is live.
        self.check("aclrtStreamWaitEvent", unsafe { f(stream, event.raw) })
    }

    /// `aclrtMemcpyAsync(dst, dest_max, src, count, kind, stream)`: queued on `stream`.
    ///
    /// # Safety
    /// `dst` holds `dest_max >= count` bytes and `src` `count` bytes of the kinds `kind`
    /// names; both stay valid, and nobody else writes `dst`, until the copy completes on
    /// `stream`. Host memory should be page-locked (`aclrtMallocHost` or
    /// [`host_register`](Self::host_register)).
    pub unsafe fn memcpy_async(
        &self,
        dst: *mut c_void,
        dest_max: usize,
        src: *const c_void,
        count: usize,
        kind: MemcpyKind,
        stream: &Stream,
    ) -> Result<(), AclError> {
        let f = self.need(self.opt.memcpy_async, "aclrtMemcpyAsync")?;
        // SAFETY: the caller vouches for the ranges; `stream` is live.
        self.check("aclrtMemcpyAsync", unsafe {
            f(dst, dest_max, src, count, kind, stream.raw)
        })
    }

    /// `aclrtHostRegister(ptr, size, type, &dev_ptr)`: page-locks existing host memory
    /// (CANN wants `ptr` 4 KiB-aligned) and returns the address the device sees it at.
    ///
    /// # Safety
    /// `ptr..ptr + size` is host memory that stays allocated until
    /// [`host_unregister`](Self::host_unregister).
    pub unsafe fn host_register(
        &self,
        ptr: *mut c_void,
        size: u64,
        kind: HostRegisterType,
    ) -> Result<*mut c_void, AclError> {
        let f = self.need(self.opt.host_register, "aclrtHostRegister")?;
        self.need(self.opt.host_unregister, "aclrtHostUnregister")?;
        let mut dev = std::ptr::null_mut();
        // SAFETY: the caller vouches for the range; a valid out pointer.
        self.check("aclrtHostRegister", unsafe { f(ptr, size, kind, &mut dev) })?;
        Ok(dev)
    }

    /// `aclrtHostUnregister(ptr)`.
    ///
    /// # Safety
    /// `ptr` was registered with [`host_register`](Self::host_register) and no copy to or
    /// from it is in flight.
    pub unsafe fn host_unregister(&self, ptr: *mut c_void) -> Result<(), AclError> {
        let f = self.need(self.opt.host_unregister, "aclrtHostUnregister")?;
        // SAFETY: the caller vouches for `ptr`.
        self.check("aclrtHostUnregister", unsafe { f(ptr) })
    }
}

mod handles;
#[cfg(test)]
mod tests;

/// Builds `tests/stub/libascendcl_stub.c`, a host-memory stand-in for CANN that checks thread
/// binding, sizes, event flags and alignment, into `dir` and returns the library's path: for
/// tests of code that drives AscendCL, on machines without CANN.
///
/// # Panics
/// When `cc` cannot build it: a test that needs the stand-in must fail, not skip.
#[doc(hidden)]
pub fn build_test_stub(dir: &std::path::Path) -> PathBuf {
    let lib = dir.join("libascendcl.so");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/stub/libascendcl_stub.c");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(src)
        .status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "cc could not build {src} ({status:?}); the AscendCL tests need a C compiler"
    );
    lib
}

pub use handles::{DeviceBuffer, Event, Stream};
