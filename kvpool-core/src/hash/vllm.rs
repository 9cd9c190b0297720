//! vLLM 0.33.0's block hashes (`sha256`, `sha256_cbor`) and its `NONE_HASH` seed.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

use super::{cbor, pickle, sha256};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::test_support::{bs, none, range, LARGE};

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
}
