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

mod cbor;
mod pickle;
#[cfg(test)]
mod python_check;
mod tokens;
mod vllm;

pub use tokens::{
    extend_token_block_hashes, token_block_hash, token_block_hashes, token_root_hash,
    TOKEN_HASH_DOMAIN, TOKEN_ROOT_SEED,
};
pub use vllm::{
    none_hash, none_hash_seed_from_env, vllm_block_hashes, vllm_hash_block_tokens, VllmBlockHasher,
    VllmHashAlgo, DEFAULT_NONE_HASH_SEED,
};

use sha2::{Digest, Sha256};

use crate::key::BlockHash;

fn sha256(bytes: &[u8]) -> BlockHash {
    BlockHash(Sha256::digest(bytes).into())
}

/// The hash Ascend Store v0.23 keys a span of several consecutive hash blocks under (a
/// KV-cache group whose blocks are larger than vLLM's hash blocks, or a compressed group):
/// `sha256(b"vllm-ascend-grouped-block-hash-v1\0" ‖ u32be(k) ‖ (u32be(32) ‖ h) for each h)`.
/// (Releases from v0.25.1 key the span by its last hash instead.)
pub fn grouped_block_hash(hashes: &[BlockHash]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"vllm-ascend-grouped-block-hash-v1\0");
    h.update((hashes.len() as u32).to_be_bytes());
    for hash in hashes {
        h.update((hash.0.len() as u32).to_be_bytes());
        h.update(hash.0);
    }
    BlockHash(h.finalize().into())
}

/// Helpers the tests of every hashing module share.
#[cfg(test)]
mod test_support {
    use std::num::NonZeroUsize;

    use super::{none_hash, VllmHashAlgo};

    pub(super) fn bs(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("a positive block size")
    }

    pub(super) fn range(start: u32, end: u32) -> Vec<u32> {
        (start..end).collect()
    }

    pub(super) fn none(algo: VllmHashAlgo, seed: &str) -> String {
        none_hash(algo, seed).to_hex()
    }

    pub(super) const LARGE: [u32; 4] = [70000, 300, 5, 2147483655];
}
