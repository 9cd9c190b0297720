//! What CPython 3.8+'s C pickler (`_pickle`, which `pickle.dumps` uses)
//! writes at protocol 5 for the few types a block tuple holds.

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';
const BINBYTES8: u8 = 0x8e;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const BINUNICODE8: u8 = 0x8d;
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';

/// A frame is closed at the first object boundary once it holds this much.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// A closed frame shorter than this loses its header.
const FRAME_SIZE_MIN: usize = 4;
const FRAME_HEADER_SIZE: usize = 9;

/// `pickle.dumps(s, protocol=5)`.
pub(super) fn str_value(s: &str) -> Vec<u8> {
    let mut p = Pickler::new(s.len() + 16);
    p.save_str(s);
    p.finish()
}

/// `pickle.dumps((parent, tuple(tokens), extra_keys), protocol=5)`.
pub(super) fn block(parent: &[u8], tokens: &[u32], extra_keys: Option<&[&str]>) -> Vec<u8> {
    let keys_len: usize = extra_keys.map_or(0, |k| k.iter().map(|s| s.len() + 16).sum());
    let mut p = Pickler::new(64 + tokens.len() * 5 + keys_len);
    p.save_tuple(3, |p| {
        p.save_bytes(parent);
        p.save_tuple(tokens.len(), |p| {
            for &token in tokens {
                p.save_int(token);
            }
        });
        match extra_keys {
            None => p.save_none(),
            Some(keys) => p.save_tuple(keys.len(), |p| {
                for key in keys {
                    p.save_str(key);
                }
            }),
        }
    });
    p.finish()
}

/// The pickler's state, mirroring `_pickle.c`'s framing and memo.
struct Pickler {
    out: Vec<u8>,
    framing: bool,
    /// Where the open frame's header placeholder starts.
    frame_start: Option<usize>,
    memo_len: u32,
    /// Memo entries of strings CPython shares between equal values; other
    /// strings are never the same object twice, so never memo hits.
    shared_strs: Vec<(u32, u32)>,
}

impl Pickler {
    fn new(capacity: usize) -> Self {
        let mut p = Pickler {
            out: Vec::with_capacity(capacity + 2 * FRAME_HEADER_SIZE),
            framing: false,
            frame_start: None,
            memo_len: 0,
            shared_strs: Vec::new(),
        };
        // PROTO precedes the first frame.
        p.write(&[PROTO, 5]);
        p.framing = true;
        p
    }

    fn finish(mut self) -> Vec<u8> {
        self.write(&[STOP]);
        self.commit_frame();
        self.out
    }

    fn write(&mut self, data: &[u8]) {
        if self.framing && self.frame_start.is_none() {
            self.frame_start = Some(self.out.len());
            self.out.extend_from_slice(&[0; FRAME_HEADER_SIZE]);
        }
        self.out.extend_from_slice(data);
    }

    fn commit_frame(&mut self) {
        if !self.framing {
            return;
        }
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let len = self.out.len() - start - FRAME_HEADER_SIZE;
        if len >= FRAME_SIZE_MIN {
            self.out[start] = FRAME;
            self.out[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(len as u64).to_le_bytes());
        } else {
            self.out.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// Called where CPython's `save()` starts on any object: the only
    /// place a full frame is closed, so frames split between objects.
    fn boundary(&mut self) {
        if let Some(start) = self.frame_start {
            if self.out.len() - start - FRAME_HEADER_SIZE >= FRAME_SIZE_TARGET {
                self.commit_frame();
            }
        }
    }

    /// A bytes or str payload: one of a frame's size or more is written
    /// outside any frame, after closing the open one.
    fn write_payload(&mut self, header: &[u8], data: &[u8]) {
        let framing = self.framing;
        if data.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            self.framing = false;
        }
        self.write(header);
        self.write(data);
        self.framing = framing;
    }

    fn memoize(&mut self) -> u32 {
        self.write(&[MEMOIZE]);
        self.memo_len += 1;
        self.memo_len - 1
    }

    fn save_none(&mut self) {
        self.boundary();
        self.write(&[NONE]);
    }

    fn save_int(&mut self, value: u32) {
        self.boundary();
        let b = value.to_le_bytes();
        if value > i32::MAX as u32 {
            // LONG1 holds two's complement little-endian in
            // bit_length / 8 + 1 bytes: 5 for 2**31..2**32.
            self.write(&[LONG1, 5, b[0], b[1], b[2], b[3], 0]);
        } else if value >= 1 << 16 {
            self.write(&[BININT, b[0], b[1], b[2], b[3]]);
        } else if value >= 1 << 8 {
            self.write(&[BININT2, b[0], b[1]]);
        } else {
            self.write(&[BININT1, b[0]]);
        }
    }

    fn save_bytes(&mut self, data: &[u8]) {
        self.boundary();
        let (header, n) = sized_header(SHORT_BINBYTES, BINBYTES, BINBYTES8, data.len());
        self.write_payload(&header[..n], data);
        self.memoize();
    }

    fn save_str(&mut self, s: &str) {
        self.boundary();
        let shared = shared_str_key(s);
        if let Some(key) = shared {
            if let Some(&(_, index)) = self.shared_strs.iter().find(|(k, _)| *k == key) {
                match u8::try_from(index) {
                    Ok(i) => self.write(&[BINGET, i]),
                    Err(_) => {
                        let i = index.to_le_bytes();
                        self.write(&[LONG_BINGET, i[0], i[1], i[2], i[3]]);
                    }
                }
                return;
            }
        }
        let (header, n) = sized_header(SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, s.len());
        self.write_payload(&header[..n], s.as_bytes());
        let index = self.memoize();
        if let Some(key) = shared {
            self.shared_strs.push((key, index));
        }
    }

    /// A tuple of `len` items that `items` saves.
    fn save_tuple(&mut self, len: usize, items: impl FnOnce(&mut Self)) {
        self.boundary();
        if len == 0 {
            // The empty tuple is neither built from items nor memoized.
            self.write(&[EMPTY_TUPLE]);
            return;
        }
        if len > 3 {
            self.write(&[MARK]);
        }
        items(self);
        let close = match len {
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => TUPLE,
        };
        self.write(&[close]);
        self.memoize();
    }
}

/// The opcode and length for a payload of `len` bytes: a 1-, 4- or 8-byte length.
fn sized_header(short: u8, long: u8, long8: u8, len: usize) -> ([u8; 9], usize) {
    let mut header = [0u8; 9];
    if let Ok(n) = u8::try_from(len) {
        header[0] = short;
        header[1] = n;
        (header, 2)
    } else if let Ok(n) = u32::try_from(len) {
        header[0] = long;
        header[1..5].copy_from_slice(&n.to_le_bytes());
        (header, 5)
    } else {
        header[0] = long8;
        header[1..9].copy_from_slice(&(len as u64).to_le_bytes());
        (header, 9)
    }
}

/// CPython returns one shared object for the empty string and for every
/// one-character string below U+0100, whatever built it (the JSON and
/// msgpack decoders that carry request fields included); other equal
/// strings are distinct objects. The key is the character, or 256 for "".
fn shared_str_key(s: &str) -> Option<u32> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (None, _) => Some(256),
        (Some(c), None) if (c as u32) < 256 => Some(c as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::hash::pickle;

    #[test]
    fn pickle_layout_of_a_small_block() {
        let parent = [0xabu8; 32];
        let bytes = pickle::block(&parent, &[1, 300, 70000, 2147483655], Some(&["l"]));
        let want = [
            "8005",
            "95",
            "4000000000000000",
            "4320",
            &"ab".repeat(32),
            "94",
            "28",
            "4b01",
            "4d2c01",
            "4a70110100",
            "8a050700008000",
            "7494",
            "8c016c94",
            "8594",
            "8794",
            "2e",
        ]
        .concat();
        assert_eq!(hex::encode(bytes), want);
    }

    // Bytes and frame sizes as Python 3.11's `pickle.dumps` gives them.
    #[test]
    fn pickle_splits_frames_at_64_kib_like_cpython() {
        let bytes = pickle::block(&[0u8; 32], &[1u32; 65536], None);
        assert_eq!(bytes.len(), 131143);
        let frame_len = |at: usize| u64::from_le_bytes(bytes[at + 1..at + 9].try_into().unwrap());
        for (at, len) in [(2, 65536), (65547, 65536), (131092, 42)] {
            assert_eq!(bytes[at], 0x95, "frame at {at}");
            assert_eq!(frame_len(at), len, "frame at {at}");
        }
    }
}
