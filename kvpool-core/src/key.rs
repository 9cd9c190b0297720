//! Block keys: what a stored object is called.
//!
//! A [`BlockKey`] is a [`Namespace`] plus a [`BlockHash`]. The namespace holds
//! everything that makes the KV bytes of the same tokens differ between
//! writers: the model, the rank split and, in the current format, the KV-cache
//! group and cache family. The string form, used by backends that key by string
//! (mooncake, redis), is byte-identical to vllm-ascend's `PoolKey.to_string`,
//! in either [`KeyFormat`], so a pool shared with Ascend Store sees the same
//! objects:
//!
//! ```text
//! current: {model_basename}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@group:{g}@cache_role:kv@cache_family:{f}@{hash_hex}
//! v0.18:   {model_basename}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@{hash_hex}
//! ```
//!
//! [`Namespace::new`] spells v0.18 keys (backends and tools that only need a
//! namespace); [`Namespace::current`] the current ones, which the connector
//! writes by default.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
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
    format: KeyFormat,
    group: u32,
    cache_family: String,
    /// Layerwise keys: the layer (the worker's dense local layer index).
    layer: Option<u32>,
    prefix: String,
    fingerprint: u64,
}

/// How key strings are spelled: the Ascend Store release they are byte-identical to.
///
/// The two never alias: a current key always carries `@group:…@cache_role:kv@cache_family:…`
/// before the hash, a v0.18 key never does, so a pool holding both serves each format only its
/// own objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum KeyFormat {
    /// vllm-ascend v0.20.2 and later (v0.23.x, the current release):
    /// `{model}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@group:{g}@cache_role:kv@cache_family:{f}@{hash}`.
    #[default]
    #[serde(rename = "current")]
    Current,
    /// vllm-ascend v0.18: `{model}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@{hash}`.
    #[serde(rename = "v0.18")]
    V018,
}

impl fmt::Display for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFormat::Current => "current",
            KeyFormat::V018 => "v0.18",
        })
    }
}

impl FromStr for KeyFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "current" => Ok(KeyFormat::Current),
            "v0.18" => Ok(KeyFormat::V018),
            other => Err(Error::invalid_argument(format!(
                "unknown key format {other:?}; expected \"current\" (Ascend Store v0.20.2 and \
                 later) or \"v0.18\""
            ))),
        }
    }
}

/// Whether `family` is a `cache_family` Ascend Store writes: `default`, `mixed` or `c{N}`.
fn valid_family(family: &str) -> bool {
    match family {
        "default" | "mixed" => true,
        _ => family.strip_prefix('c').is_some_and(|n| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && !(n.len() > 1 && n.starts_with('0'))
        }),
    }
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
            KeyFormat::V018,
            0,
            String::new(),
        ))
    }

    /// A namespace spelled in the current Ascend Store format, for KV-cache group `group`
    /// and cache family `cache_family` (`default`; `c1` for MLA models; `c{N}` for compressed
    /// groups; `mixed`).
    ///
    /// # Errors
    /// `InvalidArgument` for an empty model basename or a family Ascend Store never writes.
    pub fn current(
        model: &str,
        pcp_rank: u32,
        dcp_rank: u32,
        head_or_tp_rank: u32,
        pp_rank: u32,
        group: u32,
        cache_family: &str,
    ) -> Result<Self> {
        let v018 = Self::new(model, pcp_rank, dcp_rank, head_or_tp_rank, pp_rank)?;
        if !valid_family(cache_family) {
            return Err(Error::invalid_argument(format!(
                "cache family {cache_family:?} is not one Ascend Store writes (default, mixed, \
                 c1, c4, …)"
            )));
        }
        Ok(Self::from_parts(
            v018.model,
            pcp_rank,
            dcp_rank,
            head_or_tp_rank,
            pp_rank,
            KeyFormat::Current,
            group,
            cache_family.to_string(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        model: String,
        pcp: u32,
        dcp: u32,
        head: u32,
        pp: u32,
        format: KeyFormat,
        group: u32,
        cache_family: String,
    ) -> Self {
        let mut prefix = format!("{model}@pcp{pcp}@dcp{dcp}@head_or_tp_rank:{head}@pp_rank:{pp}@");
        if format == KeyFormat::Current {
            prefix.push_str(&format!(
                "group:{group}@cache_role:kv@cache_family:{cache_family}@"
            ));
        }
        Namespace {
            model,
            pcp_rank: pcp,
            dcp_rank: dcp,
            head_or_tp_rank: head,
            pp_rank: pp,
            format,
            group,
            cache_family,
            layer: None,
            fingerprint: fingerprint_of(&prefix),
            prefix,
        }
    }

    fn respelled(&self, head: u32, pp: u32) -> Self {
        let ns = Self::from_parts(
            self.model.clone(),
            self.pcp_rank,
            self.dcp_rank,
            head,
            pp,
            self.format,
            self.group,
            self.cache_family.clone(),
        );
        match self.layer {
            Some(layer) => ns.layered(layer),
            None => ns,
        }
    }

    fn layered(mut self, layer: u32) -> Self {
        if let Some(old) = self.layer {
            let old = format!("layer_id:{old}@");
            self.prefix.truncate(self.prefix.len() - old.len());
        }
        self.prefix.push_str(&format!("layer_id:{layer}@"));
        self.fingerprint = fingerprint_of(&self.prefix);
        self.layer = Some(layer);
        self
    }

    /// The namespace of one layer's objects (layerwise saving): the current format with
    /// `@layer_id:{L}` before the hash, as Ascend Store's layerwise keys, but keeping
    /// `pp_rank` (theirs drop it, so two pipeline stages' layer 0 share a key).
    ///
    /// # Errors
    /// `InvalidArgument` for a v0.18 namespace: that release spelled layer keys differently
    /// and kvpool does not write them.
    pub fn with_layer(&self, layer: u32) -> Result<Self> {
        if self.format != KeyFormat::Current {
            return Err(Error::invalid_argument(
                "layerwise keys exist only in the current key format",
            ));
        }
        Ok(self.clone().layered(layer))
    }

    /// The layer of a layerwise namespace.
    pub fn layer(&self) -> Option<u32> {
        self.layer
    }

    /// The key format.
    pub fn format(&self) -> KeyFormat {
        self.format
    }
    /// The KV-cache group (0 in the v0.18 format, which has none).
    pub fn group(&self) -> u32 {
        self.group
    }
    /// The cache family (empty in the v0.18 format, which has none).
    pub fn cache_family(&self) -> &str {
        &self.cache_family
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
        self.respelled(head_or_tp_rank, self.pp_rank)
    }

    /// The same namespace for another `pp_rank`.
    pub fn with_pp_rank(&self, pp_rank: u32) -> Self {
        self.respelled(self.head_or_tp_rank, pp_rank)
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

fn fingerprint_of(prefix: &str) -> u64 {
    let digest = Sha256::digest(prefix.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A decimal number written as Python writes it: digits, no leading zero.
fn canonical_number(digits: &str) -> Option<u32> {
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
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

    /// The vllm-ascend string form, in the namespace's [`KeyFormat`].
    pub fn to_key_string(&self) -> String {
        let mut s = String::with_capacity(self.namespace.prefix.len() + 64);
        s.push_str(&self.namespace.prefix);
        s.push_str(&self.hash.to_hex());
        s
    }

    /// Parses either vllm-ascend string form: the current one when the fields before the
    /// hash are `@group:…@cache_role:…@cache_family:…`, else v0.18.
    ///
    /// The model part may itself contain `@`: the fixed fields are taken from
    /// the right.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "key {s:?} is not of the form \
                 {{model}}@pcp{{p}}@dcp{{d}}@head_or_tp_rank:{{h}}@pp_rank:{{pp}}@\
                 [group:{{g}}@cache_role:kv@cache_family:{{f}}@]{{64 hex}}: {why}"
            ))
        };
        let mut parts = s.rsplitn(2, '@');
        let hash_hex = parts.next().ok_or_else(|| bad("empty"))?;
        let mut rest = parts
            .next()
            .ok_or_else(|| bad("missing the fields before the hash"))?;
        let mut layer = None;
        if let Some((head, field)) = rest.rsplit_once('@') {
            if let Some(l) = field.strip_prefix("layer_id:") {
                layer = Some(
                    canonical_number(l)
                        .ok_or_else(|| bad(&format!("layer_id {l:?} is not a number")))?,
                );
                rest = head;
            }
        }
        let mut format = KeyFormat::V018;
        let (mut group, mut family) = (0u32, String::new());
        let tail: Vec<&str> = rest.rsplitn(4, '@').collect();
        if tail.len() == 4 && tail[0].starts_with("cache_family:") {
            format = KeyFormat::Current;
            family = tail[0]["cache_family:".len()..].to_string();
            if !valid_family(&family) {
                return Err(bad(&format!(
                    "cache_family {family:?} is not default, mixed or c{{N}}"
                )));
            }
            if tail[1] != "cache_role:kv" {
                return Err(bad(&format!("{:?} is not cache_role:kv", tail[1])));
            }
            let g = tail[2]
                .strip_prefix("group:")
                .ok_or_else(|| bad(&format!("{:?} is not group:{{g}}", tail[2])))?;
            group =
                canonical_number(g).ok_or_else(|| bad(&format!("group {g:?} is not a number")))?;
            rest = tail[3];
        }
        let mut parts = rest.rsplitn(5, '@');
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
        let mut namespace =
            Namespace::from_parts(model.to_string(), pcp, dcp, head, pp, format, group, family);
        if let Some(layer) = layer {
            if format != KeyFormat::Current {
                return Err(bad(
                    "layer_id needs the current format's group and cache fields",
                ));
            }
            namespace = namespace.layered(layer);
        }
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

    /// vLLM's sha256 block hashes of tokens 1000..1511 at block size 128 (PYTHONHASHSEED=0),
    /// from the Ascend Store v0.23 reference's worked examples.
    const B: [&str; 4] = [
        "d5a79ef9201c8550d69ba6d8bc1781687dfd834d125ed42931c9a6ac32ce6353",
        "b7fb2cebac79839ef3139cae0b0f5bfcb342d5c2454f208e28b4f6856a2455ab",
        "415d24191b6e4c20df0458e6d7b26603adf7b3a947b106031422e065a74bf08e",
        "ab6de795cd3e5026424e6077ac5f58c408d154ce0ebe973582d726ac3cc42ad9",
    ];

    fn h(i: usize) -> BlockHash {
        BlockHash::from_hex(B[i]).unwrap()
    }

    fn current(
        model: &str,
        head: u32,
        pp: u32,
        group: u32,
        family: &str,
        hash: BlockHash,
    ) -> String {
        let ns = Namespace::current(model, 0, 0, head, pp, group, family).unwrap();
        BlockKey::new(Arc::new(ns), hash).to_key_string()
    }

    #[test]
    fn current_format_matches_every_worked_key_of_ascend_store_v0_23() {
        // A: plain full attention, one group, TP=1, PP=1; the path form keeps the basename.
        for (i, model) in ["Qwen/Qwen2.5-7B-Instruct", "/models/Qwen2.5-7B-Instruct/"]
            .iter()
            .enumerate()
        {
            assert_eq!(
                current(model, 0, 0, 0, "default", h(i)),
                format!("Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:0@cache_role:kv@cache_family:default@{}", B[i])
            );
        }
        for (i, hex) in B.iter().enumerate().skip(2) {
            assert_eq!(
                current("Qwen/Qwen2.5-7B-Instruct", 0, 0, 0, "default", h(i)),
                format!("Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:0@cache_role:kv@cache_family:default@{hex}")
            );
        }
        // A, v0.18 form.
        let v018 = Namespace::new("Qwen/Qwen2.5-7B-Instruct", 0, 0, 0, 0).unwrap();
        assert_eq!(
            BlockKey::new(Arc::new(v018), h(0)).to_key_string(),
            format!(
                "Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@{}",
                B[0]
            )
        );
        // B: TP=2, rank 1.
        assert_eq!(
            current("Qwen/Qwen2.5-7B-Instruct", 1, 0, 0, "default", h(0)),
            format!("Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:1@pp_rank:0@group:0@cache_role:kv@cache_family:default@{}", B[0])
        );
        // C: MLA, PP stage 1.
        assert_eq!(
            current("deepseek-ai/DeepSeek-V3", 0, 1, 0, "c1", h(0)),
            format!("DeepSeek-V3@pcp0@dcp0@head_or_tp_rank:0@pp_rank:1@group:0@cache_role:kv@cache_family:c1@{}", B[0])
        );
        // D: hybrid, the same hash in two groups.
        for g in 0..2 {
            assert_eq!(
                current("openai/gpt-oss-20b", 0, 0, g, "default", h(0)),
                format!("gpt-oss-20b@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:{g}@cache_role:kv@cache_family:default@{}", B[0])
            );
        }
        // F: a c4 group keys four hash blocks by their grouped hash.
        let f = crate::hash::grouped_block_hash(&[h(0), h(1), h(2), h(3)]);
        assert_eq!(
            current("deepseek-ai/DeepSeek-V4-Flash", 0, 0, 1, "c4", f),
            "DeepSeek-V4-Flash@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:1@cache_role:kv@cache_family:c4@4421f3da5cd30621f7f299a89d7ba92c3dbe54256e6f55726bfc4aaab31eb99b"
        );
        // G: group block 256 over hash block 128.
        let g0 = crate::hash::grouped_block_hash(&[h(0), h(1)]);
        let g1 = crate::hash::grouped_block_hash(&[h(2), h(3)]);
        assert_eq!(
            current("M", 0, 0, 1, "default", g0),
            "M@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:1@cache_role:kv@cache_family:default@e6e9a2381c172c4200ae2a443f822bb4482678f04b99fc37eab0ce3e50996b2d"
        );
        assert_eq!(
            current("M", 0, 0, 1, "default", g1),
            "M@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:1@cache_role:kv@cache_family:default@5b95cc3ec00301e3a88f393051d1d202ab51e32265bb4c5246046a4334c632f5"
        );
    }

    #[test]
    fn both_formats_parse_back_and_never_alias() {
        let cur = current("/m/Qwen3-8B", 3, 1, 2, "c1", h(1));
        let old = BlockKey::new(
            Arc::new(Namespace::new("/m/Qwen3-8B", 0, 0, 3, 1).unwrap()),
            h(1),
        );
        assert_ne!(cur, old.to_key_string());
        let parsed = BlockKey::parse(&cur).unwrap();
        assert_eq!(parsed.to_key_string(), cur);
        assert_eq!(parsed.namespace().format(), KeyFormat::Current);
        assert_eq!(
            (
                parsed.namespace().group(),
                parsed.namespace().cache_family()
            ),
            (2, "c1")
        );
        let parsed_old = BlockKey::parse(&old.to_key_string()).unwrap();
        assert_eq!(parsed_old, old);
        assert_eq!(parsed_old.namespace().format(), KeyFormat::V018);
        assert_ne!(parsed, parsed_old);
        assert_ne!(parsed.fingerprint(), parsed_old.fingerprint());
        // Rank variants keep the format.
        let ns = parsed.namespace().with_head_or_tp_rank(0).with_pp_rank(0);
        assert!(ns
            .key_prefix()
            .ends_with("@head_or_tp_rank:0@pp_rank:0@group:2@cache_role:kv@cache_family:c1@"));
    }

    #[test]
    fn layer_keys_keep_pp_rank_parse_back_and_never_alias_whole_block_keys() {
        let ns = Namespace::current("/m/Qwen3-8B", 0, 0, 1, 2, 0, "default").unwrap();
        let layer = ns.with_layer(7).unwrap();
        let key = BlockKey::new(Arc::new(layer.clone()), h(0));
        let s = key.to_key_string();
        assert_eq!(
            s,
            format!(
                "Qwen3-8B@pcp0@dcp0@head_or_tp_rank:1@pp_rank:2@group:0@cache_role:kv@\
                 cache_family:default@layer_id:7@{}",
                B[0]
            )
        );
        let parsed = BlockKey::parse(&s).unwrap();
        assert_eq!(parsed, key);
        assert_eq!(parsed.namespace().layer(), Some(7));
        assert_ne!(layer, ns);
        assert_ne!(layer, ns.with_layer(8).unwrap());
        // Other ranks' and stages' layer keys stay apart, and keep the layer.
        let other = layer.with_pp_rank(0).with_head_or_tp_rank(0);
        assert!(other.key_prefix().ends_with(
            "@head_or_tp_rank:0@pp_rank:0@group:0@cache_role:kv@cache_family:default@layer_id:7@"
        ));
        assert_eq!(layer.with_layer(3).unwrap().layer(), Some(3));
        assert!(!layer
            .with_layer(3)
            .unwrap()
            .key_prefix()
            .contains("layer_id:7"));
        // v0.18 has no layer keys of this form.
        assert!(Namespace::new("m", 0, 0, 0, 0)
            .unwrap()
            .with_layer(0)
            .is_err());
        let bad = s.replace("layer_id:7", "layer_id:07");
        assert!(BlockKey::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("layer_id"));
        let old = format!(
            "m@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@layer_id:1@{}",
            B[0]
        );
        assert!(BlockKey::parse(&old).is_err());
    }

    #[test]
    fn malformed_current_keys_and_formats_are_clear_errors() {
        let good = current("Qwen3-8B", 0, 0, 0, "default", h(0));
        for (bad, what) in [
            (
                good.replace("cache_role:kv", "cache_role:state"),
                "cache_role",
            ),
            (good.replace("group:0", "group:00"), "group"),
            (good.replace("group:0", "grp:0"), "group"),
            (
                good.replace("cache_family:default", "cache_family:c0x"),
                "cache_family",
            ),
        ] {
            let err = BlockKey::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(what), "{bad}: {err}");
        }
        assert!(Namespace::current("m", 0, 0, 0, 0, 0, "weird").is_err());
        let err = "v0.23".parse::<KeyFormat>().unwrap_err().to_string();
        assert!(err.contains("current") && err.contains("v0.18"), "{err}");
        assert_eq!("v0.18".parse::<KeyFormat>().unwrap(), KeyFormat::V018);
    }

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
