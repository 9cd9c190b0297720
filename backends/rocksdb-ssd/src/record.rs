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

/// Appends the value record of `key` to `out`, gathering the payload's
/// chunks; the checksum is computed piecewise as the bytes are copied, so
/// each piece is read from memory once and from cache once.
fn write_value<'a>(out: &mut Vec<u8>, key: &[u8], payload: impl IntoIterator<Item = &'a [u8]>) {
    out.extend_from_slice(&MAGIC);
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    let mut h = Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    for chunk in payload {
        for piece in chunk.chunks(64 << 10) {
            h.update(piece);
            out.extend_from_slice(piece);
        }
    }
    out[at..at + 8].copy_from_slice(&h.digest().to_le_bytes());
}

/// The value record of `key`, with the payload gathered from its chunks.
#[cfg(test)]
pub(crate) fn encode_value<'a>(
    key: &[u8],
    payload: impl IntoIterator<Item = &'a [u8]>,
    len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    write_value(&mut out, key, payload);
    out
}

/// A RocksDB write batch built directly in its serialized form (the
/// `WriteBatch` "rep": sequence u64, count u32, then per record a type byte
/// and length-prefixed key and value; the WAL's format, stable across
/// releases). Values are gathered from the caller's memory straight into
/// it, sized once up front; building a `WriteBatch` with `put` would copy
/// each value a second time and regrow the batch as it goes.
#[derive(Debug)]
pub(crate) struct BatchRep {
    buf: Vec<u8>,
    count: u32,
}

const TYPE_DELETION: u8 = 0x0;
const TYPE_VALUE: u8 = 0x1;
const REP_HEADER: usize = 12;

fn put_varint32(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl BatchRep {
    /// A batch whose records will take about `bytes`.
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self::reusing(Vec::new(), bytes)
    }

    /// Like [`with_capacity`](Self::with_capacity), in a buffer of an earlier
    /// batch: its pages are already mapped, where a fresh multi-MiB buffer
    /// pays a page fault per 4 KiB.
    pub(crate) fn reusing(mut buf: Vec<u8>, bytes: usize) -> Self {
        buf.clear();
        buf.reserve(REP_HEADER + bytes);
        buf.resize(REP_HEADER, 0);
        BatchRep { buf, count: 0 }
    }

    fn key(&mut self, kind: u8, prefix: u8, name: &[u8]) {
        self.buf.push(kind);
        // Keys and values are bounded far below 4 GiB (key strings are a
        // few hundred bytes, values at most `MAX_VALUE`).
        put_varint32(&mut self.buf, (1 + name.len()) as u32);
        self.buf.push(prefix);
        self.buf.extend_from_slice(name);
        self.count += 1;
    }

    /// A value record under `prefix` + `name`, checksummed over `name`.
    pub(crate) fn put_value<'a>(
        &mut self,
        prefix: u8,
        name: &[u8],
        payload: impl IntoIterator<Item = &'a [u8]>,
        len: usize,
    ) {
        self.key(TYPE_VALUE, prefix, name);
        put_varint32(&mut self.buf, (HEADER_LEN + len) as u32);
        let start = self.buf.len();
        write_value(&mut self.buf, name, payload);
        debug_assert_eq!(self.buf.len() - start, HEADER_LEN + len);
    }

    /// A plain record under `prefix` + `name`.
    pub(crate) fn put(&mut self, prefix: u8, name: &[u8], value: &[u8]) {
        self.key(TYPE_VALUE, prefix, name);
        put_varint32(&mut self.buf, value.len() as u32);
        self.buf.extend_from_slice(value);
    }

    /// A deletion of `prefix` + `name`.
    pub(crate) fn delete(&mut self, prefix: u8, name: &[u8]) {
        self.key(TYPE_DELETION, prefix, name);
    }

    /// The serialized batch.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.buf[8..REP_HEADER].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
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
    fn batch_rep_is_what_rocksdb_reads() {
        struct Seen(Vec<(Vec<u8>, Option<Vec<u8>>)>);
        impl rocksdb::WriteBatchIterator for Seen {
            fn put(&mut self, key: Box<[u8]>, value: Box<[u8]>) {
                self.0.push((key.into(), Some(value.into())));
            }
            fn delete(&mut self, key: Box<[u8]>) {
                self.0.push((key.into(), None));
            }
        }
        let big = vec![7u8; 200_000];
        let mut rep = BatchRep::with_capacity(0);
        rep.put_value(b'v', b"key-1", [&big[..1000], &big[1000..]], big.len());
        rep.put(b'i', b"key-1", &encode_index(big.len(), 9));
        rep.delete(b'v', b"gone");
        let batch = rocksdb::WriteBatch::from_data(&rep.finish());
        assert_eq!(batch.len(), 3);
        let mut seen = Seen(Vec::new());
        batch.iterate(&mut seen);
        assert_eq!(seen.0[0].0, b"vkey-1");
        let record = seen.0[0].1.as_ref().unwrap();
        assert_eq!(decode_value(b"key-1", record).unwrap(), &big[..]);
        assert_eq!(
            seen.0[1],
            (
                b"ikey-1".to_vec(),
                Some(encode_index(big.len(), 9).to_vec())
            )
        );
        assert_eq!(seen.0[2], (b"vgone".to_vec(), None));
    }

    #[test]
    fn index_records_round_trip_and_reject_bad_lengths() {
        let rec = encode_index(16 << 20, 42);
        assert_eq!(decode_index(&rec), Some((16 << 20, 42)));
        assert_eq!(decode_index(&rec[..15]), None);
    }
}
