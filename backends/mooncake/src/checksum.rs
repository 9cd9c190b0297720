//! CRC-64/ECMA-182 (poly 0x42F0E1EBA9EA3693, MSB first, init 0, no final
//! xor): the object checksum Mooncake stores when a writer runs with
//! `MOONCAKE_STORE_CHECKSUM=1` (`mooncake-common/src/crc_checksum.cpp`).

const POLY: u64 = 0x42f0_e1eb_a9ea_3693;

const TABLE: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u64) << 56;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

/// The checksum of the concatenation of `chunks`.
pub(crate) fn crc64<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut crc = 0u64;
    for chunk in chunks {
        for &b in chunk {
            crc = (crc << 8) ^ TABLE[(((crc >> 56) as u8) ^ b) as usize];
        }
    }
    crc
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
