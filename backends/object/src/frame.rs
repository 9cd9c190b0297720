//! The stored form of a value: a 24-byte header, then the value's bytes.
//!
//! ```text
//! 0..4   magic  "KVPR"
//! 4      format version (1)
//! 5..8   reserved, zero
//! 8..16  payload length, u64 little-endian
//! 16..24 XXH3-64 of the payload, seeded with XXH3-64 of the key string (without key_prefix)
//! ```
//!
//! This is byte for byte the redis backend's format, so an object copied from a redis
//! value (or the other way round) under the same key verifies. A bucket is written by
//! whoever holds credentials, and a directory by any local process, so nothing read back
//! is trusted until header and checksum agree; seeding with the key makes an object
//! copied or renamed to another key fail too. XXH3 detects corruption, not tampering.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Bytes before the payload.
pub(crate) const HEADER_LEN: usize = 24;

const MAGIC: [u8; 4] = *b"KVPR";
const VERSION: u8 = 1;

/// The checksum seed of a key: XXH3-64 of its key string.
pub(crate) fn seed(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// Header and payload in one buffer, ready to upload: the payload is gathered from
/// `chunks` and hashed piece by piece as it is copied, so each byte is read from the
/// caller's memory once.
pub(crate) fn encode<'a>(seed: u64, len: usize, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let mut h = Xxh3::with_seed(seed);
    for chunk in chunks {
        // 64 KiB pieces stay in cache between the copy and the hash.
        for piece in chunk.chunks(64 << 10) {
            out.extend_from_slice(piece);
            h.update(piece);
        }
    }
    let checksum = h.digest();
    out[16..24].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// Why a stored object is not a value kvpool wrote under this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Not kvpool's format at all (no magic, too short, another version): left alone.
    Foreign(String),
    /// kvpool's header, but the bytes do not match it (flipped, truncated, another key's).
    Damaged(String),
}

impl Invalid {
    pub(crate) fn message(&self) -> &str {
        match self {
            Invalid::Foreign(m) | Invalid::Damaged(m) => m,
        }
    }
}

/// The payload length an object of `stored_len` bytes holds.
pub(crate) fn payload_len(stored_len: u64) -> Option<usize> {
    usize::try_from(stored_len.checked_sub(HEADER_LEN as u64)?).ok()
}

/// The payload of a whole stored object, once its header and checksum check out.
pub(crate) fn verify(stored: &[u8], seed: u64) -> Result<&[u8], Invalid> {
    if stored.len() < HEADER_LEN {
        return Err(Invalid::Foreign(format!(
            "the object is {} bytes, shorter than kvpool's {HEADER_LEN}-byte header; it was \
             not written by kvpool",
            stored.len()
        )));
    }
    if stored[..4] != MAGIC {
        return Err(Invalid::Foreign(
            "the object does not start with kvpool's magic; it was not written by kvpool".into(),
        ));
    }
    if stored[4] != VERSION {
        return Err(Invalid::Foreign(format!(
            "the object has format version {}, this kvpool reads version {VERSION}",
            stored[4]
        )));
    }
    if stored[5..8] != [0, 0, 0] {
        return Err(Invalid::Damaged(
            "the object's header has non-zero reserved bytes".into(),
        ));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&stored[8..16]);
    let declared = u64::from_le_bytes(word);
    let payload = &stored[HEADER_LEN..];
    if declared != payload.len() as u64 {
        return Err(Invalid::Damaged(format!(
            "the header declares {declared} bytes but {} follow it; the object is truncated \
             or padded",
            payload.len()
        )));
    }
    word.copy_from_slice(&stored[16..24]);
    let want = u64::from_le_bytes(word);
    let got = xxh3_64_with_seed(payload, seed);
    if got != want {
        return Err(Invalid::Damaged(format!(
            "checksum mismatch (stored {want:016x}, computed {got:016x}): the bytes changed \
             after they were written, or belong to another key"
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_splitting_does_not_change_the_bytes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let whole = encode(seed("k"), data.len(), [&data[..]].into_iter());
        let split = encode(
            seed("k"),
            data.len(),
            [&data[..1], &data[1..70_000], &data[70_000..]].into_iter(),
        );
        assert_eq!(whole, split);
        assert_eq!(whole.len(), HEADER_LEN + data.len());
        assert_eq!(verify(&whole, seed("k")).unwrap(), &data[..]);
        assert_eq!(payload_len(whole.len() as u64), Some(data.len()));
        assert_eq!(payload_len(3), None);
    }

    #[test]
    fn same_bytes_as_the_redis_format() {
        // Header fields at the documented offsets; checksum is the one-shot seeded XXH3.
        let stored = encode(seed("key"), 5, [&b"hello"[..]].into_iter());
        assert_eq!(&stored[..8], b"KVPR\x01\0\0\0");
        assert_eq!(&stored[8..16], &5u64.to_le_bytes());
        assert_eq!(
            &stored[16..24],
            &xxh3_64_with_seed(b"hello", xxh3_64(b"key")).to_le_bytes()
        );
    }

    #[test]
    fn any_flipped_bit_or_other_key_fails() {
        let stored = encode(seed("k"), 11, [&b"hello world"[..]].into_iter());
        for i in 0..stored.len() {
            for bit in 0..8 {
                let mut bad = stored.clone();
                bad[i] ^= 1 << bit;
                assert!(verify(&bad, seed("k")).is_err(), "byte {i} bit {bit}");
            }
        }
        let err = verify(&stored, seed("other")).unwrap_err();
        assert!(
            matches!(&err, Invalid::Damaged(m) if m.contains("checksum")),
            "{err:?}"
        );
    }

    #[test]
    fn foreign_and_truncated_objects_say_why() {
        assert!(matches!(
            verify(b"a plain object, not kvpool's", 0),
            Err(Invalid::Foreign(m)) if m.contains("magic")
        ));
        assert!(matches!(verify(b"KVPR", 0), Err(Invalid::Foreign(m)) if m.contains("shorter")));
        let stored = encode(seed("k"), 10, [&b"0123456789"[..]].into_iter());
        assert!(matches!(
            verify(&stored[..stored.len() - 1], seed("k")),
            Err(Invalid::Damaged(m)) if m.contains("truncated")
        ));
        let mut v2 = stored.clone();
        v2[4] = 2;
        assert!(
            matches!(verify(&v2, seed("k")), Err(Invalid::Foreign(m)) if m.contains("version 2"))
        );
    }
}
