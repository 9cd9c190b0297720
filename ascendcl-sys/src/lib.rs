//! Hand-written, run-time-loaded bindings to AscendCL (`libascendcl.so`).
//!
//! Nothing links against CANN: [`AscendCl::load`] opens the library with
//! `libloading`, so a build without CANN works and only the call fails, with
//! an error that says CANN is missing. See `README.md` for what is covered.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// `aclError`: 0 is success.
pub type AclErrorCode = c_int;

/// `ACL_SUCCESS`.
pub const ACL_SUCCESS: AclErrorCode = 0;

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
#[error("{call} failed with aclError {code}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct AclError {
    /// The function that failed.
    pub call: &'static str,
    /// Its `aclError`.
    pub code: AclErrorCode,
    /// `aclGetRecentErrMsg()`, when CANN had one.
    pub message: Option<String>,
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
    // Keeps the function pointers above valid; declared last so it is
    // dropped after them.
    _lib: libloading::Library,
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
        Err(AclError {
            call,
            code,
            message,
        })
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
            .ok_or(AclError {
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
            .ok_or(AclError {
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
}

/// Memory from `aclrtMalloc` or `aclrtMallocHost`, freed on drop.
pub struct DeviceBuffer {
    acl: Arc<AscendCl>,
    ptr: *mut c_void,
    len: usize,
    host: bool,
}

// SAFETY: device memory has no thread affinity; CANN calls take the pointer
// from any thread bound to the device.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw pointer, for other CANN calls.
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("host", &self.host)
            .finish()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let free = if self.host {
            self.acl.free_host
        } else {
            self.acl.free
        };
        // SAFETY: allocated by the matching allocator and freed once.
        let _ = unsafe { free(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These machines have no CANN: loading must fail with the hint, not
    /// crash. Where CANN is installed, a host-memory round trip runs instead.
    #[test]
    fn loads_or_says_cann_is_missing() {
        match AscendCl::load() {
            Err(e @ LoadError::NotInstalled { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("CANN is not installed"), "{msg}");
                assert!(msg.contains("\"protocol\": \"tcp\""), "{msg}");
                assert!(msg.contains("/usr/local/Ascend"), "{msg}");
            }
            Err(e) => panic!("{e}"),
            Ok(acl) => {
                acl.init(None).unwrap();
                let buf = acl.malloc_host(4096).unwrap();
                acl.copy_to_device(&buf, 96, &[7u8; 100]).unwrap();
                let mut back = [0u8; 100];
                acl.copy_to_host(&mut back, &buf, 96).unwrap();
                assert_eq!(back, [7u8; 100]);
                assert!(acl.copy_to_device(&buf, 4000, &[0u8; 100]).is_err());
                drop(buf);
                acl.finalize().unwrap();
            }
        }
    }

    #[test]
    fn search_order_starts_with_the_environment_and_ends_with_the_linker() {
        let paths = search_paths();
        assert_eq!(paths.last().unwrap(), &PathBuf::from("libascendcl.so"));
        assert!(paths
            .iter()
            .any(|p| p.starts_with("/usr/local/Ascend/ascend-toolkit/latest")));
    }
}
