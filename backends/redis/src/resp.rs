//! RESP2, the redis wire protocol, for the standalone fast path: commands encoded into a
//! reused buffer and replies parsed in place, borrowed from the read buffer.
//!
//! The `redis` crate copies a value into its command, its packed pipeline and its
//! connection's write buffer on the way out, and into an owned `Vec` on the way in, and
//! allocates per command and per reply. For blocks of a few KiB that client work cost as
//! much as the server's (see `README.md`, "Benchmark"). Here a value is copied once into
//! the write buffer and read once out of the read buffer, and nothing is allocated per
//! command once the buffers have grown.
//!
//! Only what kvpool's commands answer is accepted: simple strings, errors, integers and
//! bulk strings. Anything else (an array, a RESP3 type) is a protocol error, which drops
//! the connection: after a reply we cannot frame, the stream cannot be trusted.

/// The longest simple string or error line accepted. Redis's own are well under 1 KiB;
/// a server that sends more without a line end is not speaking RESP.
const MAX_LINE: usize = 64 << 10;

/// The longest bulk string accepted: above redis's largest `proto-max-bulk-len` that
/// kvpool could have written (512 MiB values plus the header) with room to spare, and
/// small enough that a garbled length cannot make us allocate without bound.
pub(crate) const MAX_BULK: usize = 1 << 30;

/// One reply, borrowing from the buffer it was parsed from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// `+OK`: a status reply, without the `+` and the line end.
    Simple(&'a [u8]),
    /// `-ERR ...`: the whole line, `-` and `\r\n` included, as the `redis` crate parses it.
    Error(&'a [u8]),
    /// `:42`.
    Int(i64),
    /// `$-1`: no value (a missing key, a `SET NX` that did not set).
    Nil,
    /// `$3\r\nabc`: the bytes.
    Bulk(&'a [u8]),
}

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// A whole frame, and how many bytes of the buffer it took.
    Frame(Frame<'a>, usize),
    /// The buffer holds the start of a frame; at least this many bytes (from the start
    /// of the buffer) are needed before trying again.
    Incomplete(usize),
}

/// Parses the frame at the start of `buf`. `Err` says what is wrong with a reply that
/// is not RESP2 as kvpool's commands answer it.
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed<'_>, String> {
    let Some(&kind) = buf.first() else {
        return Ok(Parsed::Incomplete(1));
    };
    if !matches!(kind, b'+' | b'-' | b':' | b'$') {
        return Err(format!(
            "unexpected reply type {:?}; kvpool's commands answer a status, an error, an \
             integer or a bulk string",
            char::from(kind)
        ));
    }
    // The line end is searched after the type byte.
    let Some(eol) = find_crlf(&buf[1..]).map(|i| i + 1) else {
        if buf.len() > MAX_LINE {
            return Err(format!(
                "a reply line is longer than {MAX_LINE} bytes without a line end"
            ));
        }
        return Ok(Parsed::Incomplete(buf.len() + 1));
    };
    let line = &buf[1..eol];
    let after = eol + 2;
    let frame = match kind {
        b'+' => Frame::Simple(line),
        b'-' => Frame::Error(&buf[..after]),
        b':' => Frame::Int(integer(line)?),
        // `$`, the only type left after the check above.
        _ => {
            let len = integer(line)?;
            if len == -1 {
                Frame::Nil
            } else {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= MAX_BULK)
                    .ok_or_else(|| format!("a bulk string length of {len} is out of range"))?;
                let end = after + len;
                if buf.len() < end + 2 {
                    return Ok(Parsed::Incomplete(end + 2));
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(format!(
                        "a bulk string of {len} bytes does not end with CRLF"
                    ));
                }
                return Ok(Parsed::Frame(Frame::Bulk(&buf[after..end]), end + 2));
            }
        }
    };
    Ok(Parsed::Frame(frame, after))
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\r') {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// A RESP integer: an optional `-` and 1 to 19 digits that fit in an `i64`.
fn integer(digits: &[u8]) -> Result<i64, String> {
    let bad = || {
        format!(
            "{:?} is not an integer",
            String::from_utf8_lossy(&digits[..digits.len().min(32)])
        )
    };
    let (negative, body) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if body.is_empty() || body.len() > 19 {
        return Err(bad());
    }
    let mut n: i64 = 0;
    for &d in body {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(if negative { -n } else { n })
}

/// Appends `n` in decimal: lengths are written twice per argument, and this avoids
/// `fmt`'s machinery.
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Starts a command of `args` arguments, its name included.
pub(crate) fn command(out: &mut Vec<u8>, args: usize) {
    out.push(b'*');
    push_decimal(out, args);
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument.
pub(crate) fn arg(out: &mut Vec<u8>, a: &[u8]) {
    arg_parts(out, a.len(), std::iter::once(a));
}

/// Appends one argument of `len` bytes made of `parts`, which must add up to `len`.
pub(crate) fn arg_parts<'a>(out: &mut Vec<u8>, len: usize, parts: impl Iterator<Item = &'a [u8]>) {
    out.push(b'$');
    push_decimal(out, len);
    out.extend_from_slice(b"\r\n");
    out.reserve(len + 2);
    let start = out.len();
    for p in parts {
        out.extend_from_slice(p);
    }
    debug_assert_eq!(
        out.len() - start,
        len,
        "argument parts add up to its length"
    );
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(buf: &[u8]) -> (Frame<'_>, usize) {
        match parse(buf).unwrap() {
            Parsed::Frame(f, n) => (f, n),
            Parsed::Incomplete(n) => panic!("incomplete, needs {n}"),
        }
    }

    #[test]
    fn every_reply_kind_parses_and_says_how_long_it_was() {
        assert_eq!(whole(b"+OK\r\nrest"), (Frame::Simple(b"OK"), 5));
        assert_eq!(
            whole(b"-OOM command not allowed\r\n"),
            (Frame::Error(b"-OOM command not allowed\r\n"), 26)
        );
        assert_eq!(whole(b":-42\r\n"), (Frame::Int(-42), 6));
        assert_eq!(whole(b":0\r\n"), (Frame::Int(0), 4));
        assert_eq!(whole(b"$-1\r\n"), (Frame::Nil, 5));
        assert_eq!(whole(b"$0\r\n\r\n"), (Frame::Bulk(b""), 6));
        assert_eq!(
            whole(b"$5\r\na\r\nbc\r\n:1\r\n"),
            (Frame::Bulk(b"a\r\nbc"), 11)
        );
        assert_eq!(whole(b":9223372036854775807\r\n").0, Frame::Int(i64::MAX));
    }

    #[test]
    fn a_partial_frame_asks_for_more_bytes() {
        assert_eq!(parse(b"").unwrap(), Parsed::Incomplete(1));
        assert_eq!(parse(b"+O").unwrap(), Parsed::Incomplete(3));
        assert_eq!(parse(b"+OK\r").unwrap(), Parsed::Incomplete(5));
        assert_eq!(parse(b"$10\r\n").unwrap(), Parsed::Incomplete(17));
        assert_eq!(
            parse(b"$10\r\n0123456789\r").unwrap(),
            Parsed::Incomplete(17)
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b"*2\r\n"[..],
            b"%1\r\n",
            b"_\r\n",
            b"?\r\n",
            b":\r\n",
            b":12a\r\n",
            b":99999999999999999999\r\n",
            b"$-2\r\n",
            b"$2000000000\r\n",
            b"$3\r\nabcde\r\n",
            b"$x\r\n",
            b"\r\n",
            b"\r\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'+'; MAX_LINE + 2];
        assert!(parse(&long).unwrap_err().contains("line end"));
        // Arbitrary bytes never panic: every prefix of every shift of a noisy buffer.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"+-:$*\r\n0123456789-x"[(x % 19) as usize]
            })
            .collect();
        for start in 0..200 {
            for end in start..(start + 64).min(noise.len()) {
                let _ = parse(&noise[start..end]);
            }
        }
    }

    #[test]
    fn commands_encode_as_resp_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, 3);
        arg(&mut out, b"SET");
        arg(&mut out, b"k");
        arg_parts(&mut out, 5, [&b"ab"[..], b"", b"cde"].into_iter());
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nabcde\r\n");
        out.clear();
        push_decimal(&mut out, 0);
        push_decimal(&mut out, usize::MAX);
        assert_eq!(out, format!("0{}", usize::MAX).as_bytes());
    }
}
