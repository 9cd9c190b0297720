//! Block keys: what a stored object is called.
//!
//! A [`BlockKey`] is a [`Namespace`] plus a [`BlockHash`]. The namespace holds
//! everything that makes the KV bytes of the same tokens differ between
//! writers: the model and the rank split. The string form, used by backends
//! that key by string (mooncake, redis), is byte-identical to vllm-ascend
//! v0.18's `PoolKey.to_string`, so a pool shared with Ascend Store sees the
//! same objects:
//!
//! ```text
//! {model_basename}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@{hash_hex}
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The 32-byte hash of one block of tokens (and of every block before it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// Builds a hash from exactly 32 bytes, as vLLM's `request.block_hashes` holds them.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::invalid_argument(format!(
                "a block hash must be 32 bytes (sha256 or sha256_cbor); got {} bytes \
                 (vLLM's xxhash algorithms give 16 and are not supported)",
                bytes.len()
            ))
        })?;
        Ok(BlockHash(arr))
    }

    /// Parses 64 lower- or upper-case hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        if s.len() != 64 {
            return Err(Error::invalid_argument(format!(
                "a block hash is 64 hex digits; got {} characters in {s:?}",
                s.len()
            )));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid_argument(format!("block hash {s:?} is not hex: {e}")))?;
        Ok(BlockHash(out))
    }

    /// Lower-case hex, as Python's `bytes.hex()` writes it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", self.to_hex())
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Where a block's KV bytes come from: the model and this rank's share of it.
///
/// Build it once per worker and share it (`Arc`) between keys: the string
/// prefix and a fingerprint are computed here so key hashing and formatting
/// stay cheap on the hot path.
#[derive(Clone)]
pub struct Namespace {
    model: String,
    pcp_rank: u32,
    dcp_rank: u32,
    head_or_tp_rank: u32,
    pp_rank: u32,
    prefix: String,
    fingerprint: u64,
}

impl Namespace {
    /// A namespace for `model`, which may be a path or a Hugging Face id: only
    /// its last path component is kept, as vllm-ascend does
    /// (`model.rstrip("/").split("/")[-1]`).
    pub fn new(
        model: &str,
        pcp_rank: u32,
        dcp_rank: u32,
        head_or_tp_rank: u32,
        pp_rank: u32,
    ) -> Result<Self> {
        let basename = model_basename(model);
        if basename.is_empty() {
            return Err(Error::invalid_argument(format!(
                "model name {model:?} has an empty last path component"
            )));
        }
        Ok(Self::from_parts(
            basename.to_string(),
            pcp_rank,
            dcp_rank,
            head_or_tp_rank,
            pp_rank,
        ))
    }

    fn from_parts(model: String, pcp: u32, dcp: u32, head: u32, pp: u32) -> Self {
        let prefix = format!("{model}@pcp{pcp}@dcp{dcp}@head_or_tp_rank:{head}@pp_rank:{pp}@");
        let digest = Sha256::digest(prefix.as_bytes());
        let fingerprint = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        Namespace {
            model,
            pcp_rank: pcp,
            dcp_rank: dcp,
            head_or_tp_rank: head,
            pp_rank: pp,
            prefix,
            fingerprint,
        }
    }

    /// A namespace for tests and tools: the model with every rank 0.
    pub fn single_rank(model: &str) -> Result<Self> {
        Self::new(model, 0, 0, 0, 0)
    }

    /// The model's basename.
    pub fn model(&self) -> &str {
        &self.model
    }
    /// Prefill context-parallel rank.
    pub fn pcp_rank(&self) -> u32 {
        self.pcp_rank
    }
    /// Decode context-parallel rank.
    pub fn dcp_rank(&self) -> u32 {
        self.dcp_rank
    }
    /// The TP rank, or the KV-head group when TP exceeds the number of KV heads.
    pub fn head_or_tp_rank(&self) -> u32 {
        self.head_or_tp_rank
    }
    /// Pipeline-parallel rank.
    pub fn pp_rank(&self) -> u32 {
        self.pp_rank
    }

    /// The same namespace for another `head_or_tp_rank`, as the lookup expands
    /// rank 0's keys to every rank that stores data.
    pub fn with_head_or_tp_rank(&self, head_or_tp_rank: u32) -> Self {
        Self::from_parts(
            self.model.clone(),
            self.pcp_rank,
            self.dcp_rank,
            head_or_tp_rank,
            self.pp_rank,
        )
    }

    /// The same namespace for another `pp_rank`.
    pub fn with_pp_rank(&self, pp_rank: u32) -> Self {
        Self::from_parts(
            self.model.clone(),
            self.pcp_rank,
            self.dcp_rank,
            self.head_or_tp_rank,
            pp_rank,
        )
    }

    /// The string key prefix, ending in `@`.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.prefix == other.prefix
    }
}
impl Eq for Namespace {}

impl Hash for Namespace {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint);
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({})", self.prefix.trim_end_matches('@'))
    }
}

/// The last path component of a model path or id, as vllm-ascend names models in keys.
pub fn model_basename(model: &str) -> &str {
    model.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// The name of one stored block.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    namespace: Arc<Namespace>,
    hash: BlockHash,
}

impl BlockKey {
    /// A key in `namespace`.
    pub fn new(namespace: Arc<Namespace>, hash: BlockHash) -> Self {
        BlockKey { namespace, hash }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.namespace
    }

    /// The block hash.
    pub fn hash(&self) -> &BlockHash {
        &self.hash
    }

    /// A well-mixed 64-bit digest of the key, for picking shards. Equal keys
    /// have equal fingerprints.
    pub fn fingerprint(&self) -> u64 {
        let head = u64::from_le_bytes(self.hash.0[..8].try_into().expect("8 bytes"));
        self.namespace.fingerprint ^ head
    }

    /// The vllm-ascend v0.18 string form.
    pub fn to_key_string(&self) -> String {
        let mut s = String::with_capacity(self.namespace.prefix.len() + 64);
        s.push_str(&self.namespace.prefix);
        s.push_str(&self.hash.to_hex());
        s
    }

    /// Parses the vllm-ascend v0.18 string form.
    ///
    /// The model part may itself contain `@`: the fixed fields are taken from
    /// the right.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "key {s:?} is not of the form \
                 {{model}}@pcp{{p}}@dcp{{d}}@head_or_tp_rank:{{h}}@pp_rank:{{pp}}@{{64 hex}}: {why}"
            ))
        };
        let mut parts = s.rsplitn(6, '@');
        let hash_hex = parts.next().ok_or_else(|| bad("empty"))?;
        let pp = parts.next().ok_or_else(|| bad("missing pp_rank"))?;
        let head = parts.next().ok_or_else(|| bad("missing head_or_tp_rank"))?;
        let dcp = parts.next().ok_or_else(|| bad("missing dcp"))?;
        let pcp = parts.next().ok_or_else(|| bad("missing pcp"))?;
        let model = parts.next().ok_or_else(|| bad("missing model"))?;
        let number = |field: &str, value: &str, tag: &str| -> Result<u32> {
            let digits = value
                .strip_prefix(tag)
                .ok_or_else(|| bad(&format!("{field} must start with {tag:?}, got {value:?}")))?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&format!("{field} {digits:?} is not a number")));
            }
            // Only the canonical spelling: string-keyed backends store the
            // key as written, so "pcp07" must not quietly become "pcp7".
            if digits.len() > 1 && digits.starts_with('0') {
                return Err(bad(&format!("{field} {digits:?} has a leading zero")));
            }
            digits
                .parse()
                .map_err(|_| bad(&format!("{field} {digits:?} is out of range")))
        };
        let pcp = number("pcp", pcp, "pcp")?;
        let dcp = number("dcp", dcp, "dcp")?;
        let head = number("head_or_tp_rank", head, "head_or_tp_rank:")?;
        let pp = number("pp_rank", pp, "pp_rank:")?;
        if model.is_empty() {
            return Err(bad("the model name is empty"));
        }
        let hash = BlockHash::from_hex(hash_hex).map_err(|e| bad(e.message()))?;
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                "the hash must be lower-case hex, as Python's bytes.hex() writes it",
            ));
        }
        let namespace = Namespace::from_parts(model.to_string(), pcp, dcp, head, pp);
        Ok(BlockKey::new(Arc::new(namespace), hash))
    }
}

impl FromStr for BlockKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BlockKey::parse(s)
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.namespace.prefix)?;
        f.write_str(&self.hash.to_hex())
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "3f1c0000000000000000000000000000000000000000000000000000000000ab";

    #[test]
    fn string_form_matches_vllm_ascend_v0_18() {
        let ns = Namespace::new("/models/Qwen2.5-7B-Instruct/", 0, 0, 3, 1).unwrap();
        let key = BlockKey::new(Arc::new(ns), BlockHash::from_hex(HEX).unwrap());
        assert_eq!(
            key.to_key_string(),
            format!("Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:3@pp_rank:1@{HEX}")
        );
        assert_eq!(key.to_string(), key.to_key_string());
    }

    #[test]
    fn model_basename_follows_rstrip_split() {
        assert_eq!(
            model_basename("Qwen/Qwen2.5-7B-Instruct"),
            "Qwen2.5-7B-Instruct"
        );
        assert_eq!(model_basename("/a/b/c///"), "c");
        assert_eq!(model_basename("plain"), "plain");
        assert!(Namespace::single_rank("///").is_err());
    }

    #[test]
    fn parse_round_trips_and_allows_at_in_model() {
        let s = format!("we@ird@pcp1@dcp2@head_or_tp_rank:7@pp_rank:3@{HEX}");
        let key = BlockKey::parse(&s).unwrap();
        assert_eq!(key.namespace().model(), "we@ird");
        assert_eq!(key.namespace().pcp_rank(), 1);
        assert_eq!(key.namespace().dcp_rank(), 2);
        assert_eq!(key.namespace().head_or_tp_rank(), 7);
        assert_eq!(key.namespace().pp_rank(), 3);
        assert_eq!(key.to_key_string(), s);
    }

    #[test]
    fn parse_rejects_malformed_keys_naming_the_field() {
        let cases = [
            ("", "missing"),
            ("m@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@abc", "64 hex"),
            ("m@pcpx@dcp0@head_or_tp_rank:0@pp_rank:0@", "pcp"),
            ("m@pcp0@dcp0@tp_rank:0@pp_rank:0@", "head_or_tp_rank"),
            (
                "@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@",
                "model name is empty",
            ),
        ];
        for (input, needle) in cases {
            let input = if input.ends_with('@') {
                format!("{input}{HEX}")
            } else {
                input.to_string()
            };
            let err = BlockKey::parse(&input).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(needle), "{input}: {err}");
        }
        let upper = format!(
            "m@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@{}",
            HEX.to_uppercase()
        );
        assert!(BlockKey::parse(&upper)
            .unwrap_err()
            .to_string()
            .contains("lower-case"));
        let padded = format!("m@pcp07@dcp0@head_or_tp_rank:0@pp_rank:0@{HEX}");
        assert!(BlockKey::parse(&padded)
            .unwrap_err()
            .to_string()
            .contains("leading zero"));
        let non_hex = format!(
            "m@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@{}",
            "zz".repeat(32)
        );
        assert!(BlockKey::parse(&non_hex)
            .unwrap_err()
            .to_string()
            .contains("not hex"));
    }

    #[test]
    fn rank_variants_differ_and_hash_differently() {
        let ns = Namespace::single_rank("m").unwrap();
        let other = ns.with_head_or_tp_rank(1).with_pp_rank(2);
        assert_ne!(ns, other);
        assert_eq!(
            other.key_prefix(),
            "m@pcp0@dcp0@head_or_tp_rank:1@pp_rank:2@"
        );
    }

    #[test]
    fn block_hash_rejects_wrong_lengths() {
        assert!(BlockHash::from_slice(&[0u8; 16])
            .unwrap_err()
            .to_string()
            .contains("16 bytes"));
        assert_eq!(BlockHash::from_slice(&[7u8; 32]).unwrap().0, [7u8; 32]);
    }
}
