//! kvpool's own `tokens`-mode chain: a SHA-256 preimage defined here, not by pickle.

use std::num::NonZeroUsize;

use sha2::{Digest, Sha256};

use super::sha256;
use crate::key::BlockHash;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::test_support::{bs, range, LARGE};

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
}
