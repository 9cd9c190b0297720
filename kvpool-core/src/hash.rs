//! Block hashing: vLLM's hashes reproduced byte for byte, and kvpool's own chain.
//!
//! A block hash names one full block of tokens *and every block before it*:
//! each hash takes its parent's hash as input, so equal hashes mean equal
//! prefixes, and a pool keyed by them serves prefix hits.
//!
//! Two families live here:
//!
//! - **vLLM** ([`VllmHashAlgo`], [`VllmBlockHasher`]): the hashes vLLM 0.33.0
//!   puts in `Request.block_hashes`, which Ascend Store and other connectors
//!   use as pool keys. Computing them outside vLLM lets a tool (the CLI, a
//!   warm-up job, a test) name exactly the objects vLLM will look up.
//! - **tokens** ([`token_block_hash`]): kvpool's own chain. It needs no seed
//!   and no environment variable, and its encoding is defined here rather than
//!   by Python's pickle, so it cannot drift with a Python or vLLM upgrade.
//!
//! # vLLM's definition (0.33.0, `vllm/v1/core/kv_cache_utils.py`)
//!
//! ```text
//! NONE_HASH        = hash_fn(seed)                      # seed is a str
//! hash(block i)    = hash_fn((parent, tuple(tokens_i), extra_keys_i))
//! parent           = hash(block i-1), or NONE_HASH for the first block
//! extra_keys_i     = tuple([lora_name] + [cache_salt if i == 0]) or None
//! sha256(x)        = SHA-256(pickle.dumps(x, protocol=5))
//! sha256_cbor(x)   = SHA-256(cbor2.dumps(x, canonical=True))
//! ```
//!
//! Only full blocks are hashed. Multimodal and prompt-embedding extra keys
//! are not reproduced: requests that carry them cannot be hashed here.
//!
//! The `sha256` preimage is what CPython's C pickler writes, framing and memo
//! included; its output for these types has not changed since protocol 5
//! appeared (Python 3.8). The tests check it against the vectors vLLM 0.33.0
//! computed and against the local `python3`'s `pickle.dumps`.

use std::fmt;
use std::str::FromStr;

use std::num::NonZeroUsize;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::key::BlockHash;

/// The seed vLLM 0.33.0 derives `NONE_HASH` from when `PYTHONHASHSEED` is
/// unset and the algorithm is cryptographic (`sha256`, `sha256_cbor`).
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// The seed vLLM would use for `NONE_HASH`, read from this process's
/// environment the way vLLM 0.33.0's `resolve_none_hash_seed` reads its own.
///
/// `PYTHONHASHSEED` wins whenever it is set, even to the empty string (vLLM
/// tests `is not None`); otherwise [`DEFAULT_NONE_HASH_SEED`]. The value is
/// used as a *string*: `"0"` and `"00"` are different seeds. vLLM's random
/// per-process seed applies only to the xxhash algorithms, which kvpool does
/// not support. Python refuses to start with a `PYTHONHASHSEED` that is not
/// `random` or a decimal integer, so a non-UTF-8 value cannot match any vLLM
/// process; it is converted lossily.
///
/// The hashing functions never read the environment themselves: this process
/// is rarely the vLLM process, so the caller decides where the seed comes from.
pub fn none_hash_seed_from_env() -> String {
    match std::env::var_os("PYTHONHASHSEED") {
        Some(value) => value.to_string_lossy().into_owned(),
        None => DEFAULT_NONE_HASH_SEED.to_string(),
    }
}

/// A vLLM `--prefix-caching-hash-algo` that kvpool can reproduce.
///
/// Both give 32-byte hashes. vLLM's `xxhash` and `xxhash_cbor` give 16-byte
/// hashes and, without `PYTHONHASHSEED`, a random seed per process; they are
/// not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VllmHashAlgo {
    /// `sha256`, vLLM's default: SHA-256 of the pickle (protocol 5) of the block tuple.
    #[default]
    Sha256,
    /// `sha256_cbor`: SHA-256 of the canonical CBOR of the block tuple.
    Sha256Cbor,
}

impl VllmHashAlgo {
    /// Every supported algorithm.
    pub const ALL: [VllmHashAlgo; 2] = [VllmHashAlgo::Sha256, VllmHashAlgo::Sha256Cbor];

    /// vLLM's name for the algorithm, as `--prefix-caching-hash-algo` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            VllmHashAlgo::Sha256 => "sha256",
            VllmHashAlgo::Sha256Cbor => "sha256_cbor",
        }
    }
}

impl fmt::Display for VllmHashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VllmHashAlgo {
    type Err = Error;

    /// Parses vLLM's exact names; the error lists what is supported.
    fn from_str(s: &str) -> Result<Self> {
        VllmHashAlgo::ALL
            .into_iter()
            .find(|algo| algo.as_str() == s)
            .ok_or_else(|| {
                Error::config_invalid(format!(
                    "unknown vLLM prefix-caching hash algorithm {s:?}: supported are \"sha256\" \
                     (vLLM's default) and \"sha256_cbor\"; vLLM's \"xxhash\" and \"xxhash_cbor\" \
                     give 16-byte hashes and are not supported"
                ))
            })
    }
}

impl serde::Serialize for VllmHashAlgo {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for VllmHashAlgo {
    // Through `FromStr` so a config file gets the same message as the CLI.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse()
            .map_err(|e: Error| serde::de::Error::custom(e.message()))
    }
}

/// vLLM's `NONE_HASH`: `hash_fn(seed)`, the parent of every first block.
///
/// `seed` is the string vLLM resolved: [`DEFAULT_NONE_HASH_SEED`] unless
/// `PYTHONHASHSEED` is set (see [`none_hash_seed_from_env`]).
pub fn none_hash(algo: VllmHashAlgo, seed: &str) -> BlockHash {
    let preimage = match algo {
        VllmHashAlgo::Sha256 => pickle::str_value(seed),
        VllmHashAlgo::Sha256Cbor => cbor::str_value(seed),
    };
    sha256(&preimage)
}

/// vLLM 0.33.0's `hash_block_tokens(hash_fn, parent, tokens, extra_keys)`
/// for a block whose extra keys are strings (LoRA name, cache salt).
///
/// `parent` is the previous block's hash; for the first block pass
/// [`none_hash`], as vLLM substitutes `NONE_HASH` for a missing parent.
/// `extra_keys` is the tuple vLLM built, or `None`; vLLM never builds an
/// empty tuple, but `Some(&[])` is reproduced as `()` all the same.
///
/// Any number of tokens is handled, including pickle's multiple 64 KiB frames
/// for very large blocks.
///
/// Pickle memoizes by object identity, so the `sha256` bytes depend on which
/// extra keys are the *same Python object*. This follows CPython as vLLM sees
/// request strings: equal strings are separate objects, except the empty
/// string and one-character strings below U+0100, which CPython shares (so a
/// LoRA named `"a"` with cache salt `"a"` pickles the second as a memo
/// reference, exactly as in vLLM).
pub fn vllm_hash_block_tokens(
    algo: VllmHashAlgo,
    parent: &BlockHash,
    tokens: &[u32],
    extra_keys: Option<&[&str]>,
) -> BlockHash {
    let preimage = match algo {
        VllmHashAlgo::Sha256 => pickle::block(parent.as_bytes(), tokens, extra_keys),
        VllmHashAlgo::Sha256Cbor => cbor::block(parent.as_bytes(), tokens, extra_keys),
    };
    sha256(&preimage)
}

/// vLLM's hashes of every full block of `tokens`, for a request that carries
/// at most a LoRA adapter and a cache salt.
///
/// The LoRA name is an extra key of every block and the salt of the first
/// block only, in vLLM's order (`[lora_name]`, then `cache_salt`). An empty
/// salt counts as no salt, as vLLM tests it for truth; an empty LoRA name is
/// still a key, as vLLM tests the LoRA request, not its name.
pub fn vllm_block_hashes(
    algo: VllmHashAlgo,
    seed: &str,
    tokens: &[u32],
    block_size: NonZeroUsize,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> Vec<BlockHash> {
    VllmBlockHasher::new(algo, seed).block_hashes(tokens, block_size, lora_name, cache_salt)
}

/// vLLM's block hashing with `NONE_HASH` computed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VllmBlockHasher {
    algo: VllmHashAlgo,
    none_hash: BlockHash,
}

impl VllmBlockHasher {
    /// A hasher for `algo` whose chains start from `hash_fn(seed)`.
    pub fn new(algo: VllmHashAlgo, seed: &str) -> Self {
        VllmBlockHasher {
            algo,
            none_hash: none_hash(algo, seed),
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> VllmHashAlgo {
        self.algo
    }

    /// `NONE_HASH`, the parent of every first block.
    pub fn none_hash(&self) -> &BlockHash {
        &self.none_hash
    }

    /// One block: [`vllm_hash_block_tokens`] with `None` meaning `NONE_HASH`.
    pub fn hash_block(
        &self,
        parent: Option<&BlockHash>,
        tokens: &[u32],
        extra_keys: Option<&[&str]>,
    ) -> BlockHash {
        let parent = parent.unwrap_or(&self.none_hash);
        vllm_hash_block_tokens(self.algo, parent, tokens, extra_keys)
    }

    /// Every full block of `tokens`; see [`vllm_block_hashes`].
    pub fn block_hashes(
        &self,
        tokens: &[u32],
        block_size: NonZeroUsize,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
    ) -> Vec<BlockHash> {
        let mut hashes = Vec::new();
        self.extend_block_hashes(&mut hashes, tokens, block_size, lora_name, cache_salt);
        hashes
    }

    /// Appends the hashes of the full blocks of `tokens` that `hashes` does
    /// not cover yet, as vLLM does when a request's tokens grow.
    ///
    /// `hashes` must hold the hashes of the first `hashes.len()` blocks of
    /// this same request.
    pub fn extend_block_hashes(
        &self,
        hashes: &mut Vec<BlockHash>,
        tokens: &[u32],
        block_size: NonZeroUsize,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
    ) {
        let cache_salt = cache_salt.filter(|salt| !salt.is_empty());
        for (index, block) in tokens
            .chunks_exact(block_size.get())
            .enumerate()
            .skip(hashes.len())
        {
            // vLLM's order: the LoRA name, then the salt on block 0 only.
            let mut keys: [&str; 2] = [""; 2];
            let mut n = 0;
            if let Some(lora) = lora_name {
                keys[n] = lora;
                n += 1;
            }
            if let (0, Some(salt)) = (index, cache_salt) {
                keys[n] = salt;
                n += 1;
            }
            let extra_keys = (n > 0).then_some(&keys[..n]);
            let hash = self.hash_block(hashes.last(), block, extra_keys);
            hashes.push(hash);
        }
    }
}

/// The domain tag that starts every kvpool `tokens`-mode block preimage, so
/// these hashes can never equal a hash of some other SHA-256 input format.
pub const TOKEN_HASH_DOMAIN: &[u8] = b"kvpool-block-v1\0";

/// The bytes whose SHA-256 is the parent of every first block in `tokens`
/// mode (see [`token_root_hash`]).
pub const TOKEN_ROOT_SEED: &[u8] = b"kvpool-root-v1\0";

/// The parent of every first block in `tokens` mode:
/// `SHA-256(b"kvpool-root-v1\0")`.
pub fn token_root_hash() -> BlockHash {
    sha256(TOKEN_ROOT_SEED)
}

/// One block in kvpool's `tokens` mode.
///
/// ```text
/// SHA-256( b"kvpool-block-v1\0"
///        || parent                          32 bytes; token_root_hash() when None
///        || u64le(len(tokens)) || u32le(token) for each token
///        || lora:  0x00  |  0x01 || u64le(len) || UTF-8
///        || salt:  0x00  |  0x01 || u64le(len) || UTF-8 )
/// ```
///
/// Every field has a fixed size or a length prefix, so two different inputs
/// never encode to the same bytes. As in vLLM, the cache salt only enters
/// the first block (`parent` is `None`) and reaches later blocks through the
/// chain; it is ignored otherwise, and an empty salt counts as none. The
/// LoRA name enters every block.
pub fn token_block_hash(
    parent: Option<&BlockHash>,
    tokens: &[u32],
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> BlockHash {
    let mut hasher = Sha256::new();
    hasher.update(TOKEN_HASH_DOMAIN);
    match parent {
        Some(parent) => hasher.update(parent.as_bytes()),
        None => hasher.update(token_root_hash().as_bytes()),
    }
    hasher.update((tokens.len() as u64).to_le_bytes());
    // Batched: one SHA-256 update per token would dominate the cost.
    let mut buf = [0u8; 1024];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (dst, token) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&token.to_le_bytes());
        }
        hasher.update(&buf[..chunk.len() * 4]);
    }
    let salt = cache_salt.filter(|salt| parent.is_none() && !salt.is_empty());
    for field in [lora_name, salt] {
        match field {
            None => hasher.update([0u8]),
            Some(s) => {
                hasher.update([1u8]);
                hasher.update((s.len() as u64).to_le_bytes());
                hasher.update(s.as_bytes());
            }
        }
    }
    BlockHash(hasher.finalize().into())
}

/// kvpool's `tokens`-mode hashes of every full block of `tokens`; a trailing
/// partial block is not hashed.
pub fn token_block_hashes(
    tokens: &[u32],
    block_size: NonZeroUsize,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> Vec<BlockHash> {
    let mut hashes = Vec::new();
    extend_token_block_hashes(&mut hashes, tokens, block_size, lora_name, cache_salt);
    hashes
}

/// Appends the `tokens`-mode hashes of the full blocks of `tokens` that
/// `hashes` does not cover yet; `hashes` must hold the first blocks' hashes
/// of this same sequence.
pub fn extend_token_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    block_size: NonZeroUsize,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) {
    for block in tokens.chunks_exact(block_size.get()).skip(hashes.len()) {
        let hash = token_block_hash(hashes.last(), block, lora_name, cache_salt);
        hashes.push(hash);
    }
}

fn sha256(bytes: &[u8]) -> BlockHash {
    BlockHash(Sha256::digest(bytes).into())
}

/// What CPython 3.8+'s C pickler (`_pickle`, which `pickle.dumps` uses)
/// writes at protocol 5 for the few types a block tuple holds.
mod pickle {
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
}

/// What `cbor2.dumps(x, canonical=True)` writes for the types a block tuple
/// holds: minimal-length heads, tuples as definite arrays, `None` as null.
mod cbor {
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
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use serde_json::{json, Value};

    use super::*;

    fn bs(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("a positive block size")
    }

    fn range(start: u32, end: u32) -> Vec<u32> {
        (start..end).collect()
    }

    fn none(algo: VllmHashAlgo, seed: &str) -> String {
        none_hash(algo, seed).to_hex()
    }

    const LARGE: [u32; 4] = [70000, 300, 5, 2147483655];

    #[test]
    fn algo_names_are_vllms_and_unknown_names_list_the_supported_ones() {
        assert_eq!(
            "sha256".parse::<VllmHashAlgo>().unwrap(),
            VllmHashAlgo::Sha256
        );
        assert_eq!(
            "sha256_cbor".parse::<VllmHashAlgo>().unwrap(),
            VllmHashAlgo::Sha256Cbor
        );
        assert_eq!(VllmHashAlgo::default(), VllmHashAlgo::Sha256);
        for algo in VllmHashAlgo::ALL {
            assert_eq!(algo.to_string().parse::<VllmHashAlgo>().unwrap(), algo);
        }
        for bad in ["xxhash", "xxhash_cbor", "SHA256", "sha256-cbor", ""] {
            let err = bad.parse::<VllmHashAlgo>().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::ConfigInvalid);
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(
                msg.contains("\"sha256\"") && msg.contains("\"sha256_cbor\""),
                "{msg}"
            );
            assert!(
                msg.contains("16-byte") && msg.contains("not supported"),
                "{msg}"
            );
        }
    }

    #[test]
    fn algo_serde_uses_vllm_names() {
        assert_eq!(
            serde_json::to_string(&VllmHashAlgo::Sha256Cbor).unwrap(),
            "\"sha256_cbor\""
        );
        let algo: VllmHashAlgo = serde_json::from_str("\"sha256\"").unwrap();
        assert_eq!(algo, VllmHashAlgo::Sha256);
        let err = serde_json::from_str::<VllmHashAlgo>("\"xxhash\"").unwrap_err();
        assert!(err.to_string().contains("16-byte"), "{err}");
    }

    #[test]
    fn none_hash_preimages_are_pickle_and_cbor_of_the_seed_string() {
        assert_eq!(
            hex::encode(pickle::str_value("0")),
            "80059505000000000000008c0130942e"
        );
        assert_eq!(hex::encode(cbor::str_value("0")), "6130");
    }

    // ascend-store.md §1.7 and §1.7.4, the latter computed by vLLM 0.33.0 itself.
    #[test]
    fn none_hash_matches_vllm() {
        use VllmHashAlgo::*;
        assert_eq!(
            none(Sha256, "0"),
            "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c"
        );
        assert_eq!(
            none(Sha256Cbor, "0"),
            "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
        );
        assert_eq!(
            none(Sha256, DEFAULT_NONE_HASH_SEED),
            "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"
        );
        assert_eq!(
            none(Sha256Cbor, DEFAULT_NONE_HASH_SEED),
            "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
        );
    }

    #[test]
    fn blocks_match_vllm_with_seed_0() {
        for (algo, want) in [
            (
                VllmHashAlgo::Sha256,
                "6358e31578a64b75ebe28cdb99d3beae65de82a2087321dc6ec84ae048faaaa6",
            ),
            (
                VllmHashAlgo::Sha256Cbor,
                "d830de3d42c00f25a2949b5d12d98642664a44872c1614c5b0147556276afc9c",
            ),
        ] {
            let hasher = VllmBlockHasher::new(algo, "0");
            assert_eq!(hasher.hash_block(None, &range(0, 16), None).to_hex(), want);
        }
    }

    #[test]
    fn blocks_match_vllm_0_33_with_the_default_seed() {
        // (algo, block 1, block 2 chained, block 1 with ('my-lora',), LARGE x4)
        let vectors = [
            (
                VllmHashAlgo::Sha256,
                "fe8fa5dda3210d0ca2031e37cbe3b001186773cd1c710beb2d45fcb51d434798",
                "8be7aaa33831156d316f1f463ae57e643deb63f42e633e2d631df88815cc4629",
                "2701c80e7f8329bbbd624d66866d4400aaa6ee85ebee48647c988eb089fb6eae",
                "d8ac92ac3e0c17e865ee77a9c562c74ec8b3c49f6e5d47e8a2d5d10190b32d15",
            ),
            (
                VllmHashAlgo::Sha256Cbor,
                "dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749",
                "c300ec275d7bf08af8fc63e76cdc0086911bbc7091e03c5cf892553bef84ef0c",
                "88672dfb59bd2dde5bb2e77cc8480c8fe96ad64f863daef93d5684c85bdb1555",
                "8c2844355c4f86ca3c6f8e603a52de6523aa905a9a7f107b7f1b3d1e9005c55a",
            ),
        ];
        for (algo, block1, block2, lora, large) in vectors {
            let hasher = VllmBlockHasher::new(algo, DEFAULT_NONE_HASH_SEED);
            let b1 = hasher.hash_block(None, &range(0, 16), None);
            assert_eq!(b1.to_hex(), block1, "{algo}");
            let b2 = hasher.hash_block(Some(&b1), &range(16, 32), None);
            assert_eq!(b2.to_hex(), block2, "{algo}");
            let with_lora = hasher.hash_block(None, &range(0, 16), Some(&["my-lora"]));
            assert_eq!(with_lora.to_hex(), lora, "{algo}");
            let tokens = LARGE.repeat(4);
            assert_eq!(
                hasher.hash_block(None, &tokens, None).to_hex(),
                large,
                "{algo}"
            );

            // The free functions agree with the hasher.
            let root = none_hash(algo, DEFAULT_NONE_HASH_SEED);
            assert_eq!(vllm_hash_block_tokens(algo, &root, &range(0, 16), None), b1);
            let chain = vllm_block_hashes(
                algo,
                DEFAULT_NONE_HASH_SEED,
                &range(0, 40),
                bs(16),
                None,
                None,
            );
            assert_eq!(chain, vec![b1, b2]);
        }
    }

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

    #[test]
    fn block_hashes_put_lora_on_every_block_and_salt_on_the_first() {
        for algo in VllmHashAlgo::ALL {
            let hasher = VllmBlockHasher::new(algo, "0");
            let tokens = range(0, 50);
            let got = hasher.block_hashes(&tokens, bs(16), Some("lora"), Some("salt"));
            assert_eq!(got.len(), 3, "the partial block is not hashed");
            let b0 = hasher.hash_block(None, &tokens[0..16], Some(&["lora", "salt"]));
            let b1 = hasher.hash_block(Some(&b0), &tokens[16..32], Some(&["lora"]));
            let b2 = hasher.hash_block(Some(&b1), &tokens[32..48], Some(&["lora"]));
            assert_eq!(got, vec![b0, b1, b2]);

            let salted = hasher.block_hashes(&tokens, bs(16), None, Some("salt"));
            let s0 = hasher.hash_block(None, &tokens[0..16], Some(&["salt"]));
            assert_eq!(salted[0], s0);
            assert_eq!(
                salted[1],
                hasher.hash_block(Some(&s0), &tokens[16..32], None)
            );

            // vLLM tests the salt for truth.
            assert_eq!(
                hasher.block_hashes(&tokens, bs(16), None, Some("")),
                hasher.block_hashes(&tokens, bs(16), None, None)
            );

            let mut grown = hasher.block_hashes(&tokens[..20], bs(16), Some("lora"), Some("salt"));
            assert_eq!(grown.len(), 1);
            hasher.extend_block_hashes(&mut grown, &tokens, bs(16), Some("lora"), Some("salt"));
            assert_eq!(grown, got);
            assert!(hasher
                .block_hashes(&tokens[..15], bs(16), None, None)
                .is_empty());
        }
    }

    #[test]
    fn token_mode_matches_independent_vectors() {
        // Computed with Python's hashlib and struct from the documented encoding.
        assert_eq!(
            token_root_hash().to_hex(),
            "dbf26f89ce3d213151b77dad5d135ec5d3e600dddcf37ddf1548212d39f4594a"
        );
        let a = token_block_hash(None, &range(0, 16), None, None);
        assert_eq!(
            a.to_hex(),
            "6ec64509b1d13624d7d2593d4cfcddbddb4a1670b2cdccaa889f9249b8403ae6"
        );
        assert_eq!(
            token_block_hash(Some(&a), &range(16, 32), None, None).to_hex(),
            "c23d8e1b7312b7e59f21987e4b46dfe62074cc0ec487e8ecaa66004acf7a93ca"
        );
        assert_eq!(
            token_block_hash(None, &range(0, 16), Some("my-lora"), None).to_hex(),
            "1808536ecc57fcb6096f507e5761b915fa85e95724a8e0409d33f61c8915869e"
        );
        let d = token_block_hash(None, &range(0, 16), None, Some("tenant-a"));
        assert_eq!(
            d.to_hex(),
            "3b30a8149e58eb3884d11ce733ed4ea4b5f68412794e56140c2c0150fa077411"
        );
        assert_eq!(
            token_block_hash(None, &range(0, 16), Some("my-lora"), Some("tenant-a")).to_hex(),
            "d460819aed76f44cbd02ac586148bbecdd41f3b4d199bfb5c24b68591cac2dbf"
        );
        assert_eq!(
            token_block_hash(Some(&d), &range(16, 32), None, None).to_hex(),
            "42ca1dd401c92ee530813d78a24722444ce2fd6c54239ec3fd55116eb2ed83c4"
        );
        assert_eq!(
            token_block_hash(None, &LARGE.repeat(4), None, None).to_hex(),
            "dd4d7c826ae208491b72aa7f3479cb52e45f6420212b5f34ce0f41fa03422a68"
        );
        assert_eq!(
            token_block_hash(None, &[], None, None).to_hex(),
            "76893aab22e0387befb68159003f86394e2c4933bbcfb9e5e7209adb659dcd49"
        );
    }

    #[test]
    fn token_mode_chains_and_separates_lora_and_salt() {
        let tokens = range(0, 64);
        let base = token_block_hashes(&tokens, bs(16), None, None);
        assert_eq!(base.len(), 4);
        assert_eq!(base[0], token_block_hash(None, &tokens[..16], None, None));
        assert_eq!(
            base[1],
            token_block_hash(Some(&base[0]), &tokens[16..32], None, None)
        );

        // A change in block 1 changes every later block, though their tokens are equal.
        let mut edited = tokens.clone();
        edited[3] = 999;
        let other = token_block_hashes(&edited, bs(16), None, None);
        assert!(base.iter().zip(&other).all(|(a, b)| a != b));

        let lora = token_block_hashes(&tokens, bs(16), Some("my-lora"), None);
        assert!(base.iter().zip(&lora).all(|(a, b)| a != b));
        assert_ne!(
            token_block_hash(None, &tokens[..16], Some(""), None),
            base[0],
            "an empty LoRA name is still a LoRA"
        );

        let salted = token_block_hashes(&tokens, bs(16), None, Some("tenant-a"));
        assert!(base.iter().zip(&salted).all(|(a, b)| a != b));
        // The salt enters only the first block; later ones differ through the chain.
        assert_eq!(
            salted[1],
            token_block_hash(Some(&salted[0]), &tokens[16..32], None, None)
        );
        assert_eq!(
            token_block_hash(Some(&base[0]), &tokens[16..32], None, Some("tenant-a")),
            base[1]
        );
        assert_eq!(token_block_hashes(&tokens, bs(16), None, Some("")), base);

        // Field boundaries are unambiguous: moving bytes between LoRA and salt changes the hash.
        assert_ne!(
            token_block_hash(None, &tokens[..16], Some("ab"), Some("c")),
            token_block_hash(None, &tokens[..16], Some("a"), Some("bc"))
        );
        assert_ne!(
            token_block_hash(None, &[], Some("x"), None),
            token_block_hash(None, &[], None, Some("x"))
        );

        let mut grown = token_block_hashes(&tokens[..40], bs(16), None, Some("tenant-a"));
        assert_eq!(grown.len(), 2);
        extend_token_block_hashes(&mut grown, &tokens, bs(16), None, Some("tenant-a"));
        assert_eq!(grown, salted);
        assert!(token_block_hashes(&tokens[..15], bs(16), None, None).is_empty());
    }

    /// Python side of the cross-check: `sha256` is hashed from the real
    /// `pickle.dumps`; `sha256_cbor` from a small canonical encoder written
    /// from RFC 8949, since the standard library has no CBOR. Strings come
    /// from `json.loads`, so their object identity (which pickle's memo
    /// follows) is what a request's decoded fields have.
    const PYTHON_CHECK: &str = r#"
import hashlib, json, pickle, sys

def pickle_fn(obj):
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()

def cbor_head(out, major, n):
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes([major << 5 | 24, n])
    elif n < 1 << 16:
        out.append(major << 5 | 25); out += n.to_bytes(2, "big")
    elif n < 1 << 32:
        out.append(major << 5 | 26); out += n.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27); out += n.to_bytes(8, "big")

def cbor(out, v):
    if v is None:
        out.append(0xF6)
    elif isinstance(v, int):
        assert v >= 0; cbor_head(out, 0, v)
    elif isinstance(v, bytes):
        cbor_head(out, 2, len(v)); out += v
    elif isinstance(v, str):
        b = v.encode("utf-8"); cbor_head(out, 3, len(b)); out += b
    elif isinstance(v, tuple):
        cbor_head(out, 4, len(v))
        for x in v:
            cbor(out, x)
    else:
        raise TypeError(type(v))

def cbor_fn(obj):
    out = bytearray(); cbor(out, obj)
    return hashlib.sha256(bytes(out)).digest()

def chain(fn, c):
    none_hash = fn(c["seed"])
    tokens, bs, lora, salt = c["tokens"], c["block_size"], c["lora"], c["salt"]
    parent, out = None, []
    for start in range(0, len(tokens) - bs + 1, bs):
        keys = ([lora] if lora is not None else []) + ([salt] if start == 0 and salt else [])
        h = fn((parent or none_hash, tuple(tokens[start:start + bs]), tuple(keys) if keys else None))
        out.append(h.hex()); parent = h
    return out

data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
result = {}
for name, fn in (("sha256", pickle_fn), ("sha256_cbor", cbor_fn)):
    result[name] = {
        "seeds": [fn(s).hex() for s in data["seeds"]],
        "blocks": [
            fn((bytes.fromhex(b["parent"]), tuple(b["tokens"]),
                None if b["extra"] is None else tuple(b["extra"]))).hex()
            for b in data["blocks"]
        ],
        "chains": [chain(fn, c) for c in data["chains"]],
    }
json.dump(result, sys.stdout)
"#;

    /// Token values that hit every pickle and CBOR integer width, in a
    /// deterministic order so frame boundaries fall mid-sequence.
    fn mixed_tokens(n: usize, mut state: u64) -> Vec<u32> {
        const EDGES: [u32; 14] = [
            0, 1, 23, 24, 255, 256, 65535, 65536, 2147483647, 2147483648, 4294967295, 70000, 300, 5,
        ];
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (state >> 33) as u32;
                // One token in three is an edge value.
                match r % 3 {
                    0 => EDGES[(r / 3) as usize % EDGES.len()],
                    _ => r,
                }
            })
            .collect()
    }

    #[test]
    fn vllm_hashes_match_python() {
        let parent = none_hash(VllmHashAlgo::Sha256, DEFAULT_NONE_HASH_SEED);
        let mut blocks: Vec<(Vec<u32>, Option<Vec<String>>)> = Vec::new();
        for n in [0, 1, 2, 3, 4, 127, 128, 255, 256, 65535, 65536, 100_000] {
            blocks.push((mixed_tokens(n, n as u64), None));
        }
        let edges = vec![
            255, 256, 65535, 65536, 2147483647, 2147483648, 4294967295, 0, 1,
        ];
        blocks.push((edges.clone(), None));
        blocks.push((vec![7; 100], None));
        blocks.push((vec![u32::MAX; 40_000], None));
        blocks.push((vec![300; 40_000], None));
        let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let many: Vec<String> = (0..300)
            .map(|i| format!("k{i}"))
            .chain(["a".to_string(), "a".to_string()])
            .collect();
        for extra in [
            strings(&["my-lora"]),
            strings(&["my-lora", "tenant-salt"]),
            strings(&["same", "same"]),
            strings(&["a", "a"]),
            strings(&["", ""]),
            strings(&["\u{e9}", "\u{e9}"]),
            strings(&["\u{100}", "\u{100}"]),
            strings(&["日本語-lora"]),
            strings(&["a", "b", "c", "a"]),
            strings(&[]),
            Some(vec!["L".repeat(300)]),
            Some(vec!["L".repeat(70_000), "s".to_string()]),
            // Payloads of 64 KiB and more are written outside any frame.
            Some(vec!["M".repeat(65_535), "N".repeat(65_536)]),
            Some(many),
        ] {
            blocks.push((range(0, 16), extra.clone()));
            blocks.push((edges.clone(), extra.clone()));
            blocks.push((mixed_tokens(65536, 7), extra));
        }
        let seeds: Vec<String> = [
            "0",
            DEFAULT_NONE_HASH_SEED,
            "",
            "\u{e9}",
            "random",
            "4294967295",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([300, 65_535, 65_536, 70_000].map(|n| "y".repeat(n)))
        .collect();
        let chain_tokens = mixed_tokens(100, 99);
        let chains = [
            ("0", 16, None, None),
            (DEFAULT_NONE_HASH_SEED, 16, Some("my-lora"), None),
            (DEFAULT_NONE_HASH_SEED, 16, None, Some("tenant")),
            ("0", 7, Some("my-lora"), Some("tenant")),
            ("0", 16, Some("a"), Some("a")),
            ("0", 16, Some("same"), Some("same")),
            ("0", 16, Some(""), Some("")),
            ("0", 1, None, Some("s")),
            ("0", 100, None, None),
            ("0", 101, None, None),
        ];

        let input = json!({
            "seeds": seeds,
            "blocks": blocks.iter().map(|(tokens, extra)| json!({
                "parent": parent.to_hex(), "tokens": tokens, "extra": extra,
            })).collect::<Vec<_>>(),
            "chains": chains.iter().map(|(seed, bs, lora, salt)| json!({
                "seed": seed, "tokens": chain_tokens, "block_size": bs,
                "lora": lora, "salt": salt,
            })).collect::<Vec<_>>(),
        });
        let python = run_python(PYTHON_CHECK, &input.to_string());

        for algo in VllmHashAlgo::ALL {
            let want = &python[algo.as_str()];
            let hexes = |v: &Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h.as_str().unwrap().to_string())
                    .collect()
            };
            for (seed, want) in seeds.iter().zip(hexes(&want["seeds"])) {
                assert_eq!(
                    none(algo, seed),
                    want,
                    "{algo} seed of {} chars",
                    seed.len()
                );
            }
            for ((tokens, extra), want) in blocks.iter().zip(hexes(&want["blocks"])) {
                let keys: Option<Vec<&str>> = extra
                    .as_ref()
                    .map(|k| k.iter().map(String::as_str).collect());
                let got = vllm_hash_block_tokens(algo, &parent, tokens, keys.as_deref());
                assert_eq!(
                    got.to_hex(),
                    want,
                    "{algo}: {} tokens, extra keys {:?}",
                    tokens.len(),
                    keys.map(|k| k.iter().map(|s| s.len()).collect::<Vec<_>>())
                );
            }
            let want_chains = want["chains"].as_array().unwrap();
            for (&(seed, block, lora, salt), want) in chains.iter().zip(want_chains) {
                let got: Vec<String> =
                    vllm_block_hashes(algo, seed, &chain_tokens, bs(block), lora, salt)
                        .iter()
                        .map(BlockHash::to_hex)
                        .collect();
                assert_eq!(
                    got,
                    hexes(want),
                    "{algo}: chain {seed:?} {block} {lora:?} {salt:?}"
                );
            }
        }
    }

    /// Runs `script` under `python3`. A missing interpreter fails the test:
    /// the cross-check is the only evidence that the pickle bytes are exact.
    fn run_python(script: &str, stdin: &str) -> Value {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is required for this cross-check: {e}"));
        let mut pipe = child.stdin.take().unwrap();
        let input = stdin.to_string();
        let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            output.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}
