//! CRC-64/ECMA-182 (poly 0x42F0E1EBA9EA3693, MSB first, init 0, no final
//! xor): the object checksum Mooncake stores when a writer runs with
//! `MOONCAKE_STORE_CHECKSUM=1` (`mooncake-common/src/crc_checksum.cpp`).
//!
//! Public (hidden) only so `kvpool-benches` can measure it; not an API.

use crc::{Crc, Table, CRC_64_ECMA_182};

// Slice-by-16: it runs on every value on the data path, where the
// byte-at-a-time table is several times slower. A `static`, not a `const`,
// so the 32 KiB of tables exist once instead of being copied to each use.
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_ECMA_182);

/// The checksum of the concatenation of `chunks`.
pub fn crc64<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut digest = CRC64.digest();
    for chunk in chunks {
        digest.update(chunk);
    }
    digest.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_and_chunking() {
        // The catalogue check value of CRC-64/ECMA-182.
        assert_eq!(crc64([&b"123456789"[..]]), 0x6c40_df5f_0b49_7347);
        assert_eq!(crc64([&b"1234"[..], b"", b"56789"]), 0x6c40_df5f_0b49_7347);
        assert_eq!(crc64([]), 0);
    }
}
