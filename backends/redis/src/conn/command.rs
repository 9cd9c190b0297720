//! What a pipeline is made of, the same for both clients: commands encoded through [`Out`],
//! replies handed back as [`Val`]s.

use redis::RedisError;

use crate::resp;

/// One reply, borrowed from the connection's read buffer or the `redis` crate's value.
pub(crate) enum Val<'a> {
    /// No value: a missing key, a `SET NX` of a present key.
    Nil,
    /// A status reply such as `OK`.
    Simple(&'a [u8]),
    /// An integer reply.
    Int(i64),
    /// A bulk string: a stored value, or part of one.
    Bulk(&'a [u8]),
    /// A reply of a kind none of kvpool's commands gives (the `redis` crate's paths only;
    /// kvpool's own client refuses such replies as a protocol error).
    Other(String),
}

/// For error messages about replies of the wrong kind: short, whatever the reply's size.
impl std::fmt::Debug for Val<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
        match self {
            Val::Nil => write!(f, "nil"),
            Val::Simple(s) => write!(f, "status {:?}", shown(s)),
            Val::Int(n) => write!(f, "integer {n}"),
            Val::Bulk(b) => write!(
                f,
                "a bulk string of {} bytes starting {:?}",
                b.len(),
                shown(b)
            ),
            Val::Other(what) => write!(f, "{}", what.chars().take(200).collect::<String>()),
        }
    }
}

/// The answer to one command: a value, or the error the server (or the link) gave for it.
pub(crate) type Reply<'a> = std::result::Result<Val<'a>, RedisError>;

/// Makes command `i` of a pipeline; called again for commands that are retried.
pub(crate) type Encode<'e> = dyn Fn(usize, &mut Out<'_>) + Sync + 'e;

/// Receives the reply to command `i` of a pipeline, once, in any order.
pub(crate) type Sink<'s> = dyn FnMut(usize, Reply<'_>) + Send + 's;

/// Where a command is encoded.
pub(crate) enum Out<'a> {
    /// RESP bytes appended to a connection's write buffer.
    Resp(&'a mut Vec<u8>),
    /// A command of the `redis` crate.
    Cmd(&'a mut redis::Cmd),
}

impl Out<'_> {
    /// Starts a command of `args` arguments, the name included.
    pub(crate) fn command(&mut self, args: usize) {
        if let Out::Resp(buf) = self {
            resp::command(buf, args);
        }
    }

    /// Adds one argument to the command being encoded.
    pub(crate) fn arg(&mut self, a: &[u8]) {
        match self {
            Out::Resp(buf) => resp::arg(buf, a),
            Out::Cmd(c) => {
                c.arg(a);
            }
        }
    }

    /// One argument of `len` bytes gathered from `parts`: a value goes straight from the
    /// caller's slices into the buffer, with no intermediate `Vec`.
    pub(crate) fn arg_parts<'p>(&mut self, len: usize, parts: impl Iterator<Item = &'p [u8]>) {
        match self {
            Out::Resp(buf) => resp::arg_parts(buf, len, parts),
            Out::Cmd(c) => {
                use redis::RedisWrite;
                use std::io::Write;
                c.reserve_space_for_args([len]);
                let mut w = c.writer_for_next_arg();
                for p in parts {
                    w.write_all(p).expect("writing to a Vec");
                }
            }
        }
    }
}
