//! KV on Ascend NPUs, through AscendCL loaded at run time.

use kvpool_core::error::{Error, ErrorKind, Result};

/// Copies between NPU memory and pinned host memory on an AscendCL stream.
#[derive(Debug)]
pub struct AscendEngine;

impl AscendEngine {
    /// Opens NPU `device`.
    ///
    /// # Errors
    /// `Unsupported` naming CANN when `libascendcl.so` cannot be loaded.
    pub fn open(device: u32) -> Result<AscendEngine> {
        match ascendcl_sys::AscendCl::load() {
            Err(e) => Err(Error::new(
                ErrorKind::Unsupported,
                format!("the KV cache is on npu:{device}, but AscendCL cannot be used: {e}"),
            )),
            Ok(_) => Err(Error::new(
                ErrorKind::Unsupported,
                "NPU copies are not implemented yet",
            )),
        }
    }
}
