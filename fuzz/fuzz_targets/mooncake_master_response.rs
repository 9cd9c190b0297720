//! Frames off the network from a (possibly hostile) mooncake_master, and the
//! etcd answers that name the master leader under HA.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvpool_backend_mooncake::fuzzing::decode_master_response(data);
    kvpool_backend_mooncake::fuzzing::decode_etcd_reply(data);
});
