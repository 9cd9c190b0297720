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
            async_round_trip(&acl);
            acl.finalize().unwrap();
        }
    }
}

/// Where CANN is installed: a host → device → host round trip on a stream, ordered by
/// an event. Never run so far (no NPU on kvpool's build machines).
fn async_round_trip(acl: &Arc<AscendCl>) {
    assert_eq!(acl.missing_optional(), Vec::<&str>::new());
    acl.set_device(0).unwrap();
    assert_eq!(acl.get_device().unwrap(), 0);
    let stream = acl.create_stream().unwrap();
    let dev = acl.malloc(4096, MallocPolicy::HugeFirst).unwrap();
    let src = acl.malloc_host(4096).unwrap();
    let dst = acl.malloc_host(4096).unwrap();
    acl.copy_to_device(&src, 0, &[9u8; 4096]).unwrap();
    // SAFETY: all three buffers hold 4096 bytes and outlive the synchronize below.
    unsafe {
        acl.memcpy_async(
            dev.as_ptr(),
            4096,
            src.as_ptr(),
            4096,
            MemcpyKind::HostToDevice,
            &stream,
        )
        .unwrap();
        acl.memcpy_async(
            dst.as_ptr(),
            4096,
            dev.as_ptr(),
            4096,
            MemcpyKind::DeviceToHost,
            &stream,
        )
        .unwrap();
    }
    let done = acl.create_event().unwrap();
    done.record(&stream).unwrap();
    done.synchronize().unwrap();
    assert!(done.is_complete().unwrap());
    let mut back = vec![0u8; 4096];
    acl.copy_to_host(&mut back, &dst, 0).unwrap();
    assert!(back.iter().all(|&b| b == 9));
    stream.synchronize().unwrap();
}

/// The resolver against a library that exists everywhere: glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod against_libc {
    use super::*;

    fn libc() -> libloading::Library {
        // SAFETY: glibc is already loaded in this process.
        unsafe { libloading::Library::new("libc.so.6") }.unwrap()
    }

    #[test]
    fn a_library_without_a_required_function_names_it() {
        let err = AscendCl::load_from("libc.so.6").unwrap_err();
        match &err {
            LoadError::MissingSymbol { symbol, path, .. } => {
                assert_eq!(*symbol, "aclInit");
                assert_eq!(path, "libc.so.6");
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string().contains("unsupported CANN version"),
            "{err}"
        );
    }

    #[test]
    fn a_library_that_cannot_be_opened_is_not_installed() {
        let err = AscendCl::load_from("/nonexistent/libascendcl.so").unwrap_err();
        assert!(matches!(err, LoadError::NotInstalled { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("CANN is not installed"), "{msg}");
        assert!(msg.contains("/nonexistent/libascendcl.so"), "{msg}");
        assert!(msg.contains("\"protocol\": \"tcp\""), "{msg}");
    }

    #[test]
    fn optional_functions_resolve_to_none_and_say_which_when_called() {
        let lib = libc();
        type F = unsafe extern "C" fn();
        // SAFETY: only compared with None, never called.
        let strlen: Option<F> = unsafe { optional(&lib, "strlen") };
        assert!(strlen.is_some());
        // SAFETY: as above.
        let missing: Option<FnCreateStream> = unsafe { optional(&lib, "aclrtCreateStream") };
        assert!(missing.is_none());
        let err = need(missing, "aclrtCreateStream", "libc.so.6").unwrap_err();
        assert_eq!(err.call(), "aclrtCreateStream");
        assert_eq!(err.code(), None);
        let msg = err.to_string();
        assert!(
            msg.contains("aclrtCreateStream is not in libc.so.6"),
            "{msg}"
        );
        assert!(msg.contains("CANN"), "{msg}");
        assert!(msg.contains("\"protocol\": \"tcp\""), "{msg}");
        // SAFETY: the types are never called.
        let all = unsafe { Optional::resolve(&lib) };
        assert_eq!(all.missing(), OPTIONAL_FUNCTIONS);
    }
}

/// The stand-in CANN built into a directory of its own.
#[cfg(target_os = "linux")]
fn stub() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ascendcl-stub-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    build_test_stub(&dir)
}

#[cfg(target_os = "linux")]
#[test]
fn streams_events_and_async_copies_against_a_stub_cann() {
    let path = stub();
    let acl = AscendCl::load_from(&path).unwrap();
    // SAFETY: the stub's counters take no arguments and return int.
    let count = |name: &str| unsafe {
        let f: libloading::Symbol<'_, unsafe extern "C" fn() -> c_int> =
            acl._lib.get(name.as_bytes()).unwrap();
        f()
    };
    assert_eq!(
        acl.missing_optional(),
        [
            "aclrtGetCurrentContext",
            "aclrtSetCurrentContext",
            "aclrtCreateStreamWithConfig",
            "aclrtCreateEvent",
            "aclrtQueryEvent"
        ]
    );
    acl.init_shared().unwrap();
    acl.init_shared().unwrap();
    let err = acl.get_device().unwrap_err();
    assert_eq!(err.code(), Some(107002));
    assert!(err.to_string().contains("stub: recent error"), "{err}");
    assert!(matches!(
        acl.create_stream_with_config(0, 0),
        Err(AclError::Unavailable {
            call: "aclrtCreateStreamWithConfig",
            ..
        })
    ));
    acl.set_device(0).unwrap();
    assert_eq!(acl.get_device().unwrap(), 0);

    let stream = acl.create_stream().unwrap();
    let src = [5u8; 64];
    let mut dst = [0u8; 64];
    // SAFETY: both arrays hold 64 bytes and outlive the copy (the stub copies at once).
    unsafe {
        acl.memcpy_async(
            dst.as_mut_ptr().cast(),
            64,
            src.as_ptr().cast(),
            64,
            MemcpyKind::DeviceToHost,
            &stream,
        )
    }
    .unwrap();
    // SAFETY: as above; the stub rejects a count over the destination's size.
    let too_long = unsafe {
        acl.memcpy_async(
            dst.as_mut_ptr().cast(),
            32,
            src.as_ptr().cast(),
            64,
            MemcpyKind::DeviceToHost,
            &stream,
        )
    };
    assert!(too_long.is_err());
    assert_eq!(dst, src);
    let event = acl.create_event().unwrap();
    assert_eq!(count("stub_live_events\0"), 1);
    event.record(&stream).unwrap();
    stream.wait_event(&event).unwrap();
    assert!(event.is_complete().unwrap());
    event.synchronize().unwrap();
    stream.synchronize().unwrap();

    let mut page = vec![0u8; 8192];
    let aligned = page
        .as_mut_ptr()
        .wrapping_add(page.as_ptr().align_offset(4096));
    // SAFETY: 4096 bytes inside `page`, unregistered before it drops.
    unsafe {
        acl.host_register(aligned.cast(), 4096, HostRegisterType::Mapped)
            .unwrap();
        assert_eq!(count("stub_registered\0"), 1);
        acl.host_unregister(aligned.cast()).unwrap();
    }
    drop(event);
    drop(stream);
    assert_eq!(count("stub_live_events\0"), 0);
    assert_eq!(count("stub_live_streams\0"), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn failed_calls_carry_the_code_and_cann_message() {
    let err = AclError::Failed {
        call: "aclrtMemcpyAsync",
        code: 107_000,
        message: Some("invalid stream".into()),
    };
    assert_eq!(err.code(), Some(107_000));
    assert_eq!(
        err.to_string(),
        "aclrtMemcpyAsync failed with aclError 107000: invalid stream"
    );
}

#[test]
fn search_order_starts_with_the_environment_and_ends_with_the_linker() {
    let paths = search_paths();
    assert_eq!(paths.last().unwrap(), &PathBuf::from("libascendcl.so"));
    assert!(paths
        .iter()
        .any(|p| p.starts_with("/usr/local/Ascend/ascend-toolkit/latest")));
}
