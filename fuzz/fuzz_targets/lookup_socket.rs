//! The scheduler ⇄ worker lookup socket: requests (v1 lookups, v2 resets) as
//! the worker reads them, with the client's encoding checked against what the
//! worker decoded, and replies as the scheduler reads them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvpool_connector::lookup::fuzzing::decode_requests(data);
    kvpool_connector::lookup::fuzzing::decode_replies(data);
});
