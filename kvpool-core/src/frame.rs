//! The stored form of a value in backends whose storage kvpool does not control (redis, object
//! stores): a 24-byte header, then the value's bytes.
//!
//! ```text
//! 0..4   magic  "KVPR"
//! 4      format version (1)
//! 5..8   reserved, zero
//! 8..16  payload length, u64 little-endian
//! 16..24 XXH3-64 of the payload, seeded with XXH3-64 of the key string (without any prefix)
//! ```
//!
//! One format for every such backend, so a value copied from one store to another under the
//! same key verifies. Other programs can write to the same server or bucket, so nothing read
//! back is trusted until header and checksum agree; seeding with the key makes a value copied
//! or renamed to another key fail too, and leaving the prefix out keeps a bulk re-prefixing
//! valid. XXH3 runs at tens of GB/s, a few percent of a block's time on the wire; it detects
//! corruption, not tampering.

use std::fmt;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;

const MAGIC: [u8; 4] = *b"KVPR";
const VERSION: u8 = 1;

/// The checksum seed of a key: XXH3-64 of its key string (without any prefix).
pub fn seed(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// The header of a payload of `len` bytes made of `chunks`.
pub fn header<'a>(
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

/// Header and payload in one buffer, ready to upload: the payload is gathered from
/// `chunks` and hashed piece by piece as it is copied, so each byte is read from the
/// caller's memory once.
pub fn encode<'a>(seed: u64, len: usize, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
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

/// Why stored bytes are not a value kvpool wrote under this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not kvpool's format at all (no magic, too short, another version).
    Foreign(String),
    /// kvpool's header, but the bytes do not match it (flipped, truncated, another key's).
    Damaged(String),
}

impl Invalid {
    /// Why, in one line.
    pub fn message(&self) -> &str {
        match self {
            Invalid::Foreign(m) | Invalid::Damaged(m) => m,
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// The payload length a value of `stored_len` bytes holds, if it can hold a header at all.
pub fn payload_len(stored_len: u64) -> Option<usize> {
    usize::try_from(stored_len.checked_sub(HEADER_LEN as u64)?).ok()
}

/// The payload length a stored value declares, given its first bytes (at least the header)
/// and its total size, once the header is kvpool's and agrees with the size.
pub fn declared_len(stored: &[u8], stored_len: usize) -> Result<usize, Invalid> {
    if stored.len() < HEADER_LEN || stored_len < HEADER_LEN {
        return Err(Invalid::Foreign(format!(
            "the stored value is {stored_len} bytes, shorter than kvpool's {HEADER_LEN}-byte \
             header; it was not written by kvpool"
        )));
    }
    if stored[..4] != MAGIC {
        return Err(Invalid::Foreign(
            "the stored value does not start with kvpool's magic; it was not written by kvpool"
                .into(),
        ));
    }
    if stored[4] != VERSION {
        return Err(Invalid::Foreign(format!(
            "the stored value has format version {}, this kvpool reads version {VERSION}",
            stored[4]
        )));
    }
    if stored[5..8] != [0, 0, 0] {
        return Err(Invalid::Damaged(
            "the stored value's header has non-zero reserved bytes".into(),
        ));
    }
    let len = u64::from_le_bytes(stored[8..16].try_into().expect("8 bytes"));
    let follow = (stored_len - HEADER_LEN) as u64;
    if len != follow {
        return Err(Invalid::Damaged(format!(
            "the header declares {len} bytes but {follow} follow it; the value is truncated or \
             padded"
        )));
    }
    Ok(len as usize)
}

/// The payload of a whole stored value, once its header and checksum check out.
pub fn verify(stored: &[u8], seed: u64) -> Result<&[u8], Invalid> {
    declared_len(stored, stored.len())?;
    let want = u64::from_le_bytes(stored[16..24].try_into().expect("8 bytes"));
    let payload = &stored[HEADER_LEN..];
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

    fn framed(key: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let len = chunks.iter().map(|c| c.len()).sum();
        let mut v = header(seed(key), len, chunks.iter().copied()).to_vec();
        for c in chunks {
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn header_and_encode_agree_and_splitting_does_not_change_the_bytes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let parts: [&[u8]; 3] = [&data[..1], &data[1..70_000], &data[70_000..]];
        let whole = encode(seed("k"), data.len(), [&data[..]].into_iter());
        assert_eq!(whole, encode(seed("k"), data.len(), parts.into_iter()));
        assert_eq!(whole, framed("k", &parts));
        assert_eq!(whole, framed("k", &[&data]));
        assert_eq!(verify(&whole, seed("k")).unwrap(), &data[..]);
        assert_eq!(
            declared_len(&whole[..HEADER_LEN], whole.len()),
            Ok(data.len())
        );
        assert_eq!(payload_len(whole.len() as u64), Some(data.len()));
        assert_eq!(payload_len(3), None);
    }

    #[test]
    fn fields_sit_at_the_documented_offsets() {
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
    fn foreign_short_and_truncated_values_say_why() {
        assert!(matches!(
            verify(b"a plain value, not kvpool's", 0),
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
