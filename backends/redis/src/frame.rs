//! The stored form of a value: a 24-byte header, then the value's bytes.
//!
//! ```text
//! 0..4   magic  "KVPR"
//! 4      format version (1)
//! 5..8   reserved, zero
//! 8..16  payload length, u64 little-endian
//! 16..24 XXH3-64 of the payload, seeded with XXH3-64 of the key (without key_prefix)
//! ```
//!
//! Redis stores whatever it is given, and other programs (or an operator with `redis-cli`)
//! may write to the same keys, so nothing read back is trusted until the header and the
//! checksum agree. Seeding the checksum with the key means a value copied or renamed to
//! another key fails verification as well; leaving the prefix out of the seed keeps a
//! bulk re-prefixing of keys valid.
//!
//! XXH3 (crate `xxhash-rust`, already a dependency of the `redis` crate) runs at tens of
//! GB/s, so checking a 512 KiB block costs a few percent of the time the block spends on
//! the wire. It detects corruption, not tampering: anyone who can write to the server can
//! also write a valid header.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Bytes before the payload.
pub(crate) const HEADER_LEN: usize = 24;

const MAGIC: [u8; 4] = *b"KVPR";
const VERSION: u8 = 1;

/// The checksum seed of `key` (the core's key string, without the prefix).
pub(crate) fn seed(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// The header of a payload of `len` bytes made of `chunks`.
pub(crate) fn header<'a>(
    seed: u64,
    len: usize,
    chunks: impl Iterator<Item = &'a [u8]> + Clone,
) -> [u8; HEADER_LEN] {
    let mut it = chunks.clone();
    let checksum = match (it.next(), it.next()) {
        // The one-shot function is faster than the streaming state for one slice.
        (Some(only), None) => xxh3_64_with_seed(only, seed),
        _ => {
            let mut h = Xxh3::with_seed(seed);
            for c in chunks {
                h.update(c);
            }
            h.digest()
        }
    };
    let mut out = [0u8; HEADER_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    out[16..24].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// The payload length a stored value declares, if it carries our header and its size
/// agrees with it. `Err` says why not, for the `Corrupted` message.
pub(crate) fn declared_len(stored: &[u8], stored_len: usize) -> Result<usize, String> {
    if stored.len() < HEADER_LEN || stored_len < HEADER_LEN {
        return Err(format!(
            "the stored value is {stored_len} bytes, shorter than kvpool's {HEADER_LEN}-byte header; \
             it was not written by kvpool"
        ));
    }
    if stored[..4] != MAGIC {
        return Err(
            "the stored value does not start with kvpool's magic; it was not written by \
                    kvpool"
                .to_string(),
        );
    }
    if stored[4] != VERSION {
        return Err(format!(
            "the stored value has format version {}, this kvpool reads version {VERSION}",
            stored[4]
        ));
    }
    if stored[5..8] != [0, 0, 0] {
        return Err("the stored value's header has non-zero reserved bytes".to_string());
    }
    let len = u64::from_le_bytes(stored[8..16].try_into().expect("8 bytes"));
    if len != (stored_len - HEADER_LEN) as u64 {
        return Err(format!(
            "the header declares {len} bytes but {} follow it; the value is truncated or padded",
            stored_len - HEADER_LEN
        ));
    }
    Ok(len as usize)
}

/// The payload of a whole stored value, once its header and checksum check out.
pub(crate) fn verify(stored: &[u8], seed: u64) -> Result<&[u8], String> {
    declared_len(stored, stored.len())?;
    let want = u64::from_le_bytes(stored[16..24].try_into().expect("8 bytes"));
    let payload = &stored[HEADER_LEN..];
    let got = xxh3_64_with_seed(payload, seed);
    if got != want {
        return Err(format!(
            "checksum mismatch (stored {want:016x}, computed {got:016x}): the bytes changed \
             after they were written, or belong to another key"
        ));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(key: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let len = chunks.iter().map(|c| c.len()).sum();
        let mut v = header(seed(key), len, chunks.iter().copied()).to_vec();
        for c in chunks {
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn round_trips_and_splitting_does_not_change_the_checksum() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let whole = frame("k", &[&data]);
        let split = frame("k", &[&data[..1], &data[1..5000], &data[5000..]]);
        assert_eq!(whole, split);
        assert_eq!(verify(&whole, seed("k")).unwrap(), &data[..]);
        assert_eq!(declared_len(&whole[..HEADER_LEN], whole.len()), Ok(10_000));
    }

    #[test]
    fn any_flipped_bit_or_other_key_fails() {
        let stored = frame("k", &[b"hello world"]);
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x10;
            assert!(verify(&bad, seed("k")).is_err(), "byte {i}");
        }
        let err = verify(&stored, seed("other")).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn foreign_short_and_truncated_values_are_rejected_with_a_reason() {
        assert!(verify(b"plain redis string, not ours", 0)
            .unwrap_err()
            .contains("magic"));
        assert!(verify(b"KVPR", 0).unwrap_err().contains("shorter"));
        let stored = frame("k", &[b"0123456789"]);
        let err = verify(&stored[..stored.len() - 1], seed("k")).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let mut v2 = stored.clone();
        v2[4] = 2;
        assert!(verify(&v2, seed("k")).unwrap_err().contains("version 2"));
    }
}
