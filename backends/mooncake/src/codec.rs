//! The subset of yalantinglibs `struct_pack` that Mooncake's master RPC uses.
//!
//! A message is `[hash u32][metainfo u8]?[type literal + NUL]?[payload]`:
//! the hash is the first four bytes of MD5 over the type literal (big-endian,
//! bit 0 cleared), bit 0 set means a metainfo byte follows, metainfo bit 2
//! means the literal follows, and bits 3–4 pick one width (1, 2, 4 or 8
//! bytes) for *every* length prefix in the message, chosen from the longest
//! container in the value actually sent. See `wire-protocol.md` §2.
//!
//! Decoding treats its input as hostile: every length is checked against the
//! bytes that remain before anything is allocated, unknown variant indices
//! and trailing bytes are errors, and nothing panics on any input.

use std::fmt;

use md5::{Digest, Md5};

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("the message ends early: {needed} more bytes were needed")]
    Truncated { needed: usize },
    #[error("type hash {got:08x} does not match the expected {want:08x} (a different type or master version)")]
    HashMismatch { got: u32, want: u32 },
    #[error(
        "the embedded type literal differs from the expected one (a different master version)"
    )]
    LiteralMismatch,
    #[error("metainfo {0:#04x} asks for struct_pack features this client does not speak")]
    UnsupportedMetainfo(u8),
    #[error("length {len} is larger than the {left} bytes left in the message")]
    LengthTooLarge { len: u64, left: usize },
    #[error("invalid {what} tag {tag}")]
    BadTag { what: &'static str, tag: u8 },
    #[error("a string is not valid UTF-8")]
    BadUtf8,
    #[error("{0} unexpected bytes after the value")]
    TrailingBytes(usize),
}

/// The most bytes a decoded vector reserves on the strength of its length prefix.
const MAX_PREALLOC: usize = 1 << 20;

/// A type with a `struct_pack` encoding.
pub(crate) trait Wire: Sized {
    /// Appends the type literal (`type_id.hpp`'s `get_type_literal`).
    fn literal(out: &mut Vec<u8>);
    /// The longest string or vector (in elements) inside the value, which
    /// picks the width of every length prefix in the message.
    fn max_len(&self) -> usize;
    /// Appends the payload.
    fn encode(&self, w: &mut Writer);
    /// Reads the payload.
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError>;
}

/// Payload output with the message's length width.
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
    width: usize,
}

impl Writer {
    fn put_len(&mut self, n: usize) {
        let bytes = (n as u64).to_le_bytes();
        self.buf.extend_from_slice(&bytes[..self.width]);
    }
}

/// Payload input with the message's length width.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    width: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.buf.len() {
            return Err(CodecError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    /// A length prefix, which can never exceed the bytes left: every element
    /// of every type here takes at least one byte.
    fn len(&mut self) -> Result<usize, CodecError> {
        let raw = self.take(self.width)?;
        let mut bytes = [0u8; 8];
        bytes[..raw.len()].copy_from_slice(raw);
        let len = u64::from_le_bytes(bytes);
        if len > self.buf.len() as u64 {
            return Err(CodecError::LengthTooLarge {
                len,
                left: self.buf.len(),
            });
        }
        Ok(len as usize)
    }
}

macro_rules! scalar {
    ($ty:ty, $id:expr) => {
        impl Wire for $ty {
            fn literal(out: &mut Vec<u8>) {
                out.push($id);
            }
            fn max_len(&self) -> usize {
                0
            }
            fn encode(&self, w: &mut Writer) {
                w.buf.extend_from_slice(&self.to_le_bytes());
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                Ok(<$ty>::from_le_bytes(r.array()?))
            }
        }
    };
}

scalar!(i32, 0x01);
scalar!(u32, 0x02);
scalar!(i64, 0x03);
scalar!(u64, 0x04);
scalar!(u8, 0x06);
scalar!(u16, 0x08);

impl Wire for bool {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x0b);
    }
    fn max_len(&self) -> usize {
        0
    }
    fn encode(&self, w: &mut Writer) {
        w.buf.push(u8::from(*self));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(CodecError::BadTag { what: "bool", tag }),
        }
    }
}

/// `void` / `std::monostate`: no payload.
impl Wire for () {
    fn literal(out: &mut Vec<u8>) {
        out.push(0xfa);
    }
    fn max_len(&self) -> usize {
        0
    }
    fn encode(&self, _: &mut Writer) {}
    fn decode(_: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(())
    }
}

impl Wire for String {
    fn literal(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0x80, 0x0c]);
    }
    fn max_len(&self) -> usize {
        self.len()
    }
    fn encode(&self, w: &mut Writer) {
        w.put_len(self.len());
        w.buf.extend_from_slice(self.as_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let n = r.len()?;
        let bytes = r.take(n)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::BadUtf8)
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x84);
        T::literal(out);
    }
    fn max_len(&self) -> usize {
        self.iter().map(Wire::max_len).fold(self.len(), usize::max)
    }
    fn encode(&self, w: &mut Writer) {
        w.put_len(self.len());
        for e in self {
            e.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        // `len` is bounded by the bytes left, but an element takes many times
        // its wire bytes in memory (a replica descriptor: over 100 for a few on
        // the wire), so reserving `n` up front would let a 256 MiB body claim
        // tens of GiB before its first element fails to decode. The vector
        // grows past the reservation only with elements actually decoded.
        let n = r.len()?;
        let mut out = Vec::with_capacity(n.min(MAX_PREALLOC / std::mem::size_of::<T>().max(1)));
        for _ in 0..n {
            out.push(T::decode(r)?);
        }
        Ok(out)
    }
}

impl<T: Wire> Wire for Option<T> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x85);
        T::literal(out);
    }
    fn max_len(&self) -> usize {
        self.as_ref().map_or(0, Wire::max_len)
    }
    fn encode(&self, w: &mut Writer) {
        match self {
            None => w.buf.push(0),
            Some(v) => {
                w.buf.push(1);
                v.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.byte()? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(r)?)),
            tag => Err(CodecError::BadTag {
                what: "optional",
                tag,
            }),
        }
    }
}

/// `tl::expected<T, E>`.
impl<T: Wire, E: Wire> Wire for Result<T, E> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x87);
        T::literal(out);
        E::literal(out);
    }
    fn max_len(&self) -> usize {
        match self {
            Ok(v) => v.max_len(),
            Err(e) => e.max_len(),
        }
    }
    fn encode(&self, w: &mut Writer) {
        match self {
            Ok(v) => {
                w.buf.push(1);
                v.encode(w);
            }
            Err(e) => {
                w.buf.push(0);
                e.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.byte()? {
            1 => Ok(Ok(T::decode(r)?)),
            0 => Ok(Err(E::decode(r)?)),
            tag => Err(CodecError::BadTag {
                what: "expected",
                tag,
            }),
        }
    }
}

/// An argument pack of several values: `std::tuple`, literal `fd … ff`.
macro_rules! tuple {
    ($($name:ident),+) => {
        impl<$($name: Wire),+> Wire for ($($name,)+) {
            fn literal(out: &mut Vec<u8>) {
                out.push(0xfd);
                $($name::literal(out);)+
                out.push(0xff);
            }
            #[allow(non_snake_case)]
            fn max_len(&self) -> usize {
                let ($($name,)+) = self;
                0 $(.max($name.max_len()))+
            }
            #[allow(non_snake_case)]
            fn encode(&self, w: &mut Writer) {
                let ($($name,)+) = self;
                $($name.encode(w);)+
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                Ok(($($name::decode(r)?,)+))
            }
        }
    };
}

tuple!(A, B);
tuple!(A, B, C);
tuple!(A, B, C, D);
tuple!(A, B, C, D, E);

/// A YLT_REFL or aggregate struct: fields in declaration order, literal `fd … ff`.
macro_rules! wire_struct {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty),+ $(,)? }) => {
        $(#[$meta])*
        $vis struct $name { $($(#[$fmeta])* $fvis $field: $ty),+ }

        impl $crate::codec::Wire for $name {
            fn literal(out: &mut Vec<u8>) {
                out.push(0xfd);
                $(<$ty as $crate::codec::Wire>::literal(out);)+
                out.push(0xff);
            }
            fn max_len(&self) -> usize {
                0 $(.max($crate::codec::Wire::max_len(&self.$field)))+
            }
            fn encode(&self, w: &mut $crate::codec::Writer) {
                $($crate::codec::Wire::encode(&self.$field, w);)+
            }
            fn decode(r: &mut $crate::codec::Reader<'_>) -> Result<Self, $crate::codec::CodecError> {
                Ok($name { $($field: <$ty as $crate::codec::Wire>::decode(r)?),+ })
            }
        }
    };
}
pub(crate) use wire_struct;

/// A message type's header constants: hash and literal, computed once.
#[derive(Clone)]
pub(crate) struct TypeCode {
    hash: u32,
    literal: Vec<u8>,
}

impl fmt::Debug for TypeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TypeCode({:08x})", self.hash)
    }
}

impl TypeCode {
    /// The code of `T` as a message root.
    pub(crate) fn of<T: Wire>() -> Self {
        let mut literal = Vec::new();
        T::literal(&mut literal);
        let digest = Md5::digest(&literal);
        let hash = u32::from_be_bytes(digest[..4].try_into().expect("md5 has 16 bytes")) & !1;
        TypeCode { hash, literal }
    }

    /// The type hash, bit 0 clear.
    #[cfg(test)]
    pub(crate) fn hash(&self) -> u32 {
        self.hash
    }
}

/// Serializes `v` as the official client does: with the type literal, so a
/// master checks the full type rather than just its 31-bit hash.
pub(crate) fn pack<T: Wire>(code: &TypeCode, v: &T, out: &mut Vec<u8>) {
    pack_with(code, v, true, out);
}

/// Serializes `v`, with or without the type literal (both forms are valid).
pub(crate) fn pack_with<T: Wire>(code: &TypeCode, v: &T, with_literal: bool, out: &mut Vec<u8>) {
    let max = v.max_len() as u64;
    let (width, bits) = if max < 1 << 8 {
        (1, 0x00)
    } else if max < 1 << 16 {
        (2, 0x08)
    } else if max < 1 << 32 {
        (4, 0x10)
    } else {
        (8, 0x18)
    };
    let meta = bits | if with_literal { 0x04 } else { 0 };
    if meta == 0 {
        out.extend_from_slice(&code.hash.to_le_bytes());
    } else {
        out.extend_from_slice(&(code.hash | 1).to_le_bytes());
        out.push(meta);
        if with_literal {
            out.extend_from_slice(&code.literal);
            out.push(0);
        }
    }
    let mut w = Writer {
        buf: std::mem::take(out),
        width,
    };
    v.encode(&mut w);
    *out = w.buf;
}

/// Deserializes a whole message of type `T`, with or without the literal.
pub(crate) fn unpack<T: Wire>(code: &TypeCode, buf: &[u8]) -> Result<T, CodecError> {
    let mut r = Reader { buf, width: 1 };
    let got = u32::from_le_bytes(r.array()?);
    if got & !1 != code.hash {
        return Err(CodecError::HashMismatch {
            got: got & !1,
            want: code.hash,
        });
    }
    if got & 1 == 1 {
        let meta = r.byte()?;
        if meta & 0x03 != 0 || meta & !0x1f != 0 {
            return Err(CodecError::UnsupportedMetainfo(meta));
        }
        if meta & 0x04 != 0 {
            let lit = r.take(code.literal.len() + 1)?;
            if lit[..code.literal.len()] != code.literal[..] || lit[code.literal.len()] != 0 {
                return Err(CodecError::LiteralMismatch);
            }
        }
        r.width = 1 << ((meta >> 3) & 3);
    }
    let v = T::decode(&mut r)?;
    if !r.buf.is_empty() {
        return Err(CodecError::TrailingBytes(r.buf.len()));
    }
    Ok(v)
}

/// `u32_be(MD5(name)[0..4])`: coro_rpc's function id for a registered name.
pub(crate) fn function_id(qualified_name: &str) -> u32 {
    let digest = Md5::digest(qualified_name.as_bytes());
    u32::from_be_bytes(digest[..4].try_into().expect("md5 has 16 bytes"))
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    /// 64 KiB in memory, at least one byte on the wire, and never valid.
    struct Big([u8; 1 << 16]);

    impl Wire for Big {
        fn literal(out: &mut Vec<u8>) {
            out.push(0);
        }
        fn max_len(&self) -> usize {
            self.0.len()
        }
        fn encode(&self, _: &mut Writer) {}
        fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
            Err(CodecError::BadTag {
                what: "big",
                tag: r.byte()?,
            })
        }
    }

    /// A 16 MiB body whose length prefix claims 16 Mi elements of 64 KiB each: reserving
    /// them would ask for 1 TiB (an allocation failure aborts the process); the decode
    /// must just fail on the first element.
    #[test]
    fn a_hostile_vector_length_does_not_reserve_what_it_claims() {
        let n: u64 = 16 << 20;
        let mut buf = n.to_le_bytes().to_vec();
        buf.resize(8 + n as usize, 7);
        let mut r = Reader {
            buf: &buf,
            width: 8,
        };
        match Vec::<Big>::decode(&mut r) {
            Err(CodecError::BadTag {
                what: "big",
                tag: 7,
            }) => {}
            Err(e) => panic!("{e}"),
            Ok(v) => panic!("decoded {} elements", v.len()),
        }
    }
}
