//! Values read back from a store other programs can write to (redis, object
//! stores): the checksummed header in front of every value.
#![no_main]

use kvpool_core::frame::{declared_len, encode, header, payload_len, seed, verify, HEADER_LEN};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let seed = seed("fuzz@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@00");

    // As read back: whatever verifies must be exactly what the writer encodes.
    if let Ok(payload) = verify(data, seed) {
        assert_eq!(
            encode(seed, payload.len(), std::iter::once(payload)),
            data,
            "a value verified that the writer would not have written"
        );
    }
    if let Ok(len) = declared_len(data, data.len()) {
        assert_eq!(len + HEADER_LEN, data.len());
        assert_eq!(payload_len(data.len() as u64), Some(len));
    }
    // As a ranged read sees it: the header alone, the total size told apart.
    let total = data
        .len()
        .saturating_add(usize::from(data.first().copied().unwrap_or(0)));
    if let Ok(len) = declared_len(data, total) {
        assert_eq!(len + HEADER_LEN, total);
    }

    // As written: the input as a payload, in uneven chunks, verifies back to itself, and
    // flipping any one bit of the stored form (chosen by the input) is caught.
    let chunks = || data.chunks(usize::from(data.last().copied().unwrap_or(1)).max(1));
    let mut stored = encode(seed, data.len(), chunks());
    assert_eq!(stored[..HEADER_LEN], header(seed, data.len(), chunks()));
    assert_eq!(verify(&stored, seed), Ok(data));
    let at = data.iter().map(|&b| usize::from(b)).sum::<usize>() % stored.len();
    stored[at] ^= 1 << (data.len() % 8);
    assert!(
        verify(&stored, seed).is_err(),
        "a flipped bit at {at} verified"
    );
});
