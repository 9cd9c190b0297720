//! The bytes stored per key: the value record in the data column family and
//! the index record in the index column family.

use xxhash_rust::xxh3::Xxh3;

/// Value record: `MAGIC | xxh3-64 (LE) | payload`. The checksum covers the
/// key as well as the payload, so a value that ends up under another key
/// (a bug, a damaged index block) fails the check like a flipped bit does.
pub(crate) const MAGIC: [u8; 8] = *b"KVPOOL1\0";
pub(crate) const HEADER_LEN: usize = MAGIC.len() + 8;

/// Index record: `value length (LE u64) | insertion stamp (LE u64)`. The
/// stamp restores the eviction order on reopen.
pub(crate) const INDEX_LEN: usize = 16;

fn checksum<'a>(key: &[u8], payload: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    for chunk in payload {
        h.update(chunk);
    }
    h.digest()
}

/// Builds the value record of `key` from the payload's chunks (gathered in order).
pub(crate) fn encode_value<'a>(
    key: &[u8],
    payload: impl IntoIterator<Item = &'a [u8]> + Clone,
    len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&checksum(key, payload.clone()).to_le_bytes());
    for chunk in payload {
        out.extend_from_slice(chunk);
    }
    out
}

/// The verified payload of a value record, or why it is not trustworthy.
pub(crate) fn decode_value<'r>(key: &[u8], record: &'r [u8]) -> Result<&'r [u8], String> {
    if record.len() < HEADER_LEN {
        return Err(format!(
            "record of {} bytes is shorter than its {HEADER_LEN}-byte header",
            record.len()
        ));
    }
    let (header, payload) = record.split_at(HEADER_LEN);
    if header[..MAGIC.len()] != MAGIC {
        return Err("record does not start with the kvpool magic".to_string());
    }
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&header[MAGIC.len()..]);
    let stored = u64::from_le_bytes(stored);
    let actual = checksum(key, [payload]);
    if stored != actual {
        return Err(format!(
            "xxh3 checksum mismatch: stored {stored:016x}, computed {actual:016x} over {} bytes",
            payload.len()
        ));
    }
    Ok(payload)
}

pub(crate) fn encode_index(len: usize, stamp: u64) -> [u8; INDEX_LEN] {
    let mut out = [0u8; INDEX_LEN];
    out[..8].copy_from_slice(&(len as u64).to_le_bytes());
    out[8..].copy_from_slice(&stamp.to_le_bytes());
    out
}

/// `(value length, stamp)`, or `None` for a malformed record.
pub(crate) fn decode_index(record: &[u8]) -> Option<(usize, u64)> {
    if record.len() != INDEX_LEN {
        return None;
    }
    let len = u64::from_le_bytes(record[..8].try_into().ok()?);
    let stamp = u64::from_le_bytes(record[8..].try_into().ok()?);
    Some((usize::try_from(len).ok()?, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let payload = b"hello, kv cache".to_vec();
        let rec = encode_value(b"k", [&payload[..5], &payload[5..]], payload.len());
        assert_eq!(rec.len(), HEADER_LEN + payload.len());
        assert_eq!(decode_value(b"k", &rec).unwrap(), &payload[..]);
        for byte in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode_value(b"k", &bad).is_err(), "byte {byte} bit {bit}");
            }
        }
        let err = decode_value(b"other key", &rec).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(decode_value(b"k", &rec[..HEADER_LEN - 1]).is_err());
        // Truncation is caught too: the checksum covers the payload length.
        assert!(decode_value(b"k", &rec[..rec.len() - 1]).is_err());
    }

    #[test]
    fn index_records_round_trip_and_reject_bad_lengths() {
        let rec = encode_index(16 << 20, 42);
        assert_eq!(decode_index(&rec), Some((16 << 20, 42)));
        assert_eq!(decode_index(&rec[..15]), None);
    }
}
