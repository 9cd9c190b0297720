//! Connector metadata: the plan the scheduler sends workers each step (through
//! vLLM, which may hand over bytes from another version or a corrupt message).
#![no_main]

use kvpool_connector::StepMeta;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = StepMeta::decode(data) {
        // What decodes re-encodes to a plan that decodes to the same.
        let again = StepMeta::decode(&meta.encode()).expect("an encoded plan decodes");
        assert_eq!(again, meta);
    }
});
