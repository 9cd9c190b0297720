//! Replies from a redis server (or anything listening on its port), as the
//! fast path parses them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvpool_backend_redis::fuzzing::decode_replies(data);
});
