//! The transfer engine's TCP data plane: handshakes, a segment owner's request
//! stream from any peer, and an owner's answers to a pipelined batch.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvpool_backend_mooncake::fuzzing::decode_data_plane(data);
});
