//! What `cbor2.dumps(x, canonical=True)` writes for the types a block tuple
//! holds: minimal-length heads, tuples as definite arrays, `None` as null.

const UNSIGNED: u8 = 0;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const NULL: u8 = 0xf6;

/// The CBOR of a text string.
pub(super) fn str_value(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 9);
    text(&mut out, s);
    out
}

/// The CBOR of `[parent, [tokens...], null | [extra_keys...]]`.
pub(super) fn block(parent: &[u8], tokens: &[u32], extra_keys: Option<&[&str]>) -> Vec<u8> {
    let keys_len: usize = extra_keys.map_or(0, |k| k.iter().map(|s| s.len() + 9).sum());
    let mut out = Vec::with_capacity(48 + tokens.len() * 5 + keys_len);
    head(&mut out, ARRAY, 3);
    head(&mut out, BYTES, parent.len() as u64);
    out.extend_from_slice(parent);
    head(&mut out, ARRAY, tokens.len() as u64);
    for &token in tokens {
        head(&mut out, UNSIGNED, token.into());
    }
    match extra_keys {
        None => out.push(NULL),
        Some(keys) => {
            head(&mut out, ARRAY, keys.len() as u64);
            for key in keys {
                text(&mut out, key);
            }
        }
    }
    out
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let major = major << 5;
    if n < 24 {
        out.push(major | n as u8);
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[major | 24, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(major | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(major | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(major | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use crate::hash::cbor;

    #[test]
    fn cbor_layout_of_a_small_block() {
        let parent = [0xabu8; 32];
        let tokens = [0, 23, 24, 255, 256, 65535, 65536, u32::MAX];
        let bytes = cbor::block(&parent, &tokens, Some(&["l", "s"]));
        let want = [
            "83",
            "5820",
            &"ab".repeat(32),
            "88",
            "00",
            "17",
            "1818",
            "18ff",
            "190100",
            "19ffff",
            "1a00010000",
            "1affffffff",
            "82616c6173",
        ]
        .concat();
        assert_eq!(hex::encode(bytes), want);
        let long = cbor::block(&parent, &[7; 24], None);
        assert_eq!(hex::encode(&long[35..37]), "9818");
        assert_eq!(long.last(), Some(&0xf6));
    }
}
