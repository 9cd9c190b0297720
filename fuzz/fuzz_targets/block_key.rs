//! Keys typed by users (`kvpool store --key`) or read from other writers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(key) = kvpool_core::BlockKey::parse(s) {
            // Whatever parses must print back to the same string.
            assert_eq!(key.to_key_string(), s);
        }
    }
});
