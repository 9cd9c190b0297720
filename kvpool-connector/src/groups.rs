//! KV-cache groups (vLLM's hybrid KV-cache manager, "HMA") and the rules that say, per group,
//! which blocks a prefix hit needs.
//!
//! A hybrid model keeps several KV-cache groups: full attention, sliding-window attention,
//! Mamba / linear-attention state. Each group has its own block ids (vLLM's null block, id 0,
//! marks a block the group does not keep) and its own keys (`@group:{g}`). What a prefix of
//! `n` tokens needs differs per group, exactly as in vLLM's own prefix cache
//! (`SingleTypeKVCacheManager.find_longest_cache_hit`) and Ascend Store v0.23's coordinator:
//!
//! - full attention (MLA included): every block of the prefix;
//! - sliding window of `w` tokens: the `cdiv(w - 1, block_size)` blocks ending at the prefix's
//!   end (earlier ones fall out of the window);
//! - Mamba state: the one block ending at the prefix's end (it holds the state there).
//!
//! A hit is the longest prefix every group can serve, at a multiple of every group's block
//! size.

use serde::{Deserialize, Serialize};

use kvpool_core::error::{Error, Result};
use kvpool_core::hash::grouped_block_hash;
use kvpool_core::key::BlockHash;

/// What a KV-cache group holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GroupKind {
    /// Full attention (vLLM's `FullAttentionSpec`, `MLAAttentionSpec`, chunked local attention
    /// treated as full): a prefix needs every block.
    FullAttention,
    /// Sliding-window attention over `sliding_window` tokens.
    SlidingWindow {
        /// The window in tokens (vLLM's `SlidingWindowSpec.sliding_window`).
        sliding_window: usize,
    },
    /// Mamba / linear-attention state (vLLM's `MambaSpec`, `mamba_cache_mode = "align"`): a
    /// block holds the state after its last token.
    Mamba,
}

/// One KV-cache group: `kv_cache_config.kv_cache_groups[g]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheGroup {
    /// What it holds.
    #[serde(flatten)]
    pub kind: GroupKind,
    /// Tokens per block of this group.
    pub block_size: usize,
}

impl KvCacheGroup {
    /// A full-attention group.
    pub fn full_attention(block_size: usize) -> Self {
        KvCacheGroup {
            kind: GroupKind::FullAttention,
            block_size,
        }
    }

    /// Blocks a prefix needs at its end: `None` for every block (full attention).
    pub fn blocks_needed_at_end(&self) -> Option<usize> {
        match self.kind {
            GroupKind::FullAttention => None,
            GroupKind::SlidingWindow { sliding_window } => Some(
                sliding_window
                    .saturating_sub(1)
                    .div_ceil(self.block_size.max(1)),
            ),
            GroupKind::Mamba => Some(1),
        }
    }

    /// Whether vLLM may free or rewrite this group's blocks while the request runs (sliding
    /// window blocks fall out of the window; Mamba state blocks are reused), so a save must
    /// finish reading them within its step.
    pub fn blocks_are_volatile(&self) -> bool {
        !matches!(self.kind, GroupKind::FullAttention)
    }

    /// Checks the group on its own.
    pub(crate) fn validate(&self, index: usize) -> Result<()> {
        if self.block_size == 0 {
            return Err(Error::config_invalid(format!(
                "engine layout: KV-cache group {index} has block_size 0"
            )));
        }
        if let GroupKind::SlidingWindow { sliding_window: 0 } = self.kind {
            return Err(Error::config_invalid(format!(
                "engine layout: KV-cache group {index} is a sliding window of 0 tokens"
            )));
        }
        Ok(())
    }

    /// The hashes this group's keys use for the first `blocks` of its blocks, from vLLM's
    /// block hashes at `hash_block_size` tokens each: the hash itself when the sizes match,
    /// else Ascend Store v0.23's rehash of the hashes a block covers.
    pub fn key_hashes(&self, fine: &[BlockHash], hash_block_size: usize) -> Vec<BlockHash> {
        let k = self.hashes_per_block(hash_block_size);
        if k == 1 {
            return fine.to_vec();
        }
        fine.chunks_exact(k).map(grouped_block_hash).collect()
    }

    /// The key hash of block `i` alone (see [`key_hashes`](Self::key_hashes)); `None` when
    /// `fine` does not cover the block.
    pub fn key_hash(
        &self,
        fine: &[BlockHash],
        hash_block_size: usize,
        i: usize,
    ) -> Option<BlockHash> {
        let k = self.hashes_per_block(hash_block_size);
        let covered = fine.get(i * k..(i + 1) * k)?;
        Some(if k == 1 {
            covered[0]
        } else {
            grouped_block_hash(covered)
        })
    }

    /// vLLM hash blocks per block of this group.
    pub fn hashes_per_block(&self, hash_block_size: usize) -> usize {
        (self.block_size / hash_block_size.max(1)).max(1)
    }

    /// The longest prefix of at most `max_blocks` blocks (whose end is a multiple of
    /// `align_blocks` blocks) this group can serve, in blocks, given which blocks the pool
    /// holds (`present[i]`; absent indices count as missing).
    pub fn longest_hit(&self, present: &[bool], max_blocks: usize, align_blocks: usize) -> usize {
        let align = align_blocks.max(1);
        let max_blocks = max_blocks.min(present.len());
        match self.blocks_needed_at_end() {
            None => {
                let prefix = present[..max_blocks]
                    .iter()
                    .position(|p| !p)
                    .unwrap_or(max_blocks);
                prefix / align * align
            }
            Some(need) => {
                // The rightmost aligned end with `need` present blocks before it.
                let mut end = max_blocks / align * align;
                while end > 0 {
                    let start = end.saturating_sub(need);
                    if present[start..end].iter().all(|p| *p) {
                        return end;
                    }
                    end -= align;
                }
                0
            }
        }
    }

    /// Of blocks `[first, end)` of a request, those a load of a prefix ending at block `end`
    /// needs for this group.
    pub fn load_range(&self, first: usize, end: usize) -> std::ops::Range<usize> {
        let start = match self.blocks_needed_at_end() {
            None => first,
            Some(need) => first.max(end.saturating_sub(need)),
        };
        start.min(end)..end
    }
}

/// The longest prefix (in tokens, at most `max_tokens`) that every group can serve:
/// `present[g][i]` says whether block `i` of group `g` is in the pool. As vLLM's hybrid
/// coordinator: full-attention groups first, then the others, repeated until the length
/// stops shrinking, every group's answer a multiple of the common alignment.
pub fn longest_common_hit(
    groups: &[KvCacheGroup],
    present: &[Vec<bool>],
    max_tokens: usize,
) -> usize {
    let align_tokens = alignment_tokens(groups);
    let mut hit = max_tokens / align_tokens * align_tokens;
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| groups[g].blocks_needed_at_end().is_some());
    loop {
        let before = hit;
        for &g in &order {
            let group = &groups[g];
            let bs = group.block_size.max(1);
            let blocks = group.longest_hit(&present[g], hit / bs, align_tokens / bs);
            hit = hit.min(blocks * bs);
        }
        if hit == before || hit == 0 {
            return hit;
        }
    }
}

/// Why a boundary state vLLM hands over (see [`boundary_state_block`]) is not saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundarySkip {
    /// The group index names no KV-cache group of the engine layout.
    NoSuchGroup {
        /// The number of groups.
        groups: usize,
    },
    /// The group is not a Mamba state group (vLLM hands over only Mamba "align" states).
    NotMamba,
    /// A boundary of 0 tokens (or fewer) holds no state.
    Empty,
    /// The boundary is not on one of the group's block boundaries: kvpool keys a state by the
    /// block ending at it (a sub-block boundary of vLLM's `prefix_match_unit`).
    OffBlock {
        /// The group's block size.
        block_size: usize,
    },
    /// The boundary is on a block boundary of this group but not of every group: no hit ends
    /// there, so no lookup would read it.
    Unaligned {
        /// Tokens every hit is a multiple of.
        alignment: usize,
    },
}

impl std::fmt::Display for BoundarySkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundarySkip::NoSuchGroup { groups } => {
                write!(f, "the engine has {groups} KV-cache groups")
            }
            BoundarySkip::NotMamba => f.write_str("the group is not a Mamba state group"),
            BoundarySkip::Empty => f.write_str("a boundary of no tokens holds no state"),
            BoundarySkip::OffBlock { block_size } => write!(
                f,
                "not on a boundary of the group's {block_size}-token blocks, where kvpool's \
                 hits end"
            ),
            BoundarySkip::Unaligned { alignment } => write!(
                f,
                "not a multiple of {alignment} tokens, where every hit ends"
            ),
        }
    }
}

/// The block of `groups[group]` whose key a boundary state is saved under: vLLM 0.33 hands a
/// connector exact Mamba "align" state blocks with the number of tokens each holds the state
/// after (`boundary_state_offloads`). A hit of `n` tokens reads the state block ending at `n`
/// (index `n / block_size - 1`), so a state after `boundary_tokens` goes under that block's
/// key, and only where a hit can end: on a block boundary of every group.
///
/// # Errors
/// Why the state is not saved (a value, never a panic, whatever the input).
pub fn boundary_state_block(
    groups: &[KvCacheGroup],
    group: i64,
    boundary_tokens: i64,
) -> std::result::Result<usize, BoundarySkip> {
    let g = usize::try_from(group)
        .ok()
        .and_then(|g| groups.get(g))
        .ok_or(BoundarySkip::NoSuchGroup {
            groups: groups.len(),
        })?;
    if g.kind != GroupKind::Mamba {
        return Err(BoundarySkip::NotMamba);
    }
    let tokens = usize::try_from(boundary_tokens)
        .ok()
        .filter(|&t| t > 0)
        .ok_or(BoundarySkip::Empty)?;
    let bs = g.block_size.max(1);
    if tokens % bs != 0 {
        return Err(BoundarySkip::OffBlock { block_size: bs });
    }
    let alignment = alignment_tokens(groups);
    if tokens % alignment != 0 {
        return Err(BoundarySkip::Unaligned { alignment });
    }
    Ok(tokens / bs - 1)
}

/// The least common multiple of the groups' block sizes: a hit ends on a block boundary of
/// every group.
pub fn alignment_tokens(groups: &[KvCacheGroup]) -> usize {
    groups
        .iter()
        .map(|g| g.block_size.max(1))
        .fold(1, |a, b| a / gcd(a, b) * b)
}

/// The greatest common divisor of the groups' block sizes: vLLM 0.33 hashes blocks of this
/// many tokens when the groups' sizes differ.
pub fn hash_block_size(groups: &[KvCacheGroup]) -> usize {
    groups.iter().map(|g| g.block_size).fold(0, gcd).max(1)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swa(window: usize, bs: usize) -> KvCacheGroup {
        KvCacheGroup {
            kind: GroupKind::SlidingWindow {
                sliding_window: window,
            },
            block_size: bs,
        }
    }

    fn mamba(bs: usize) -> KvCacheGroup {
        KvCacheGroup {
            kind: GroupKind::Mamba,
            block_size: bs,
        }
    }

    fn bits(s: &str) -> Vec<bool> {
        s.chars().map(|c| c == '1').collect()
    }

    #[test]
    fn full_attention_needs_a_contiguous_prefix() {
        let full = KvCacheGroup::full_attention(16);
        assert_eq!(full.longest_hit(&bits("1110111"), 7, 1), 3);
        assert_eq!(full.longest_hit(&bits("1111111"), 5, 1), 5);
        assert_eq!(full.longest_hit(&bits("1111111"), 7, 2), 6);
        assert_eq!(full.longest_hit(&bits("0111111"), 7, 1), 0);
        assert_eq!(
            full.longest_hit(&bits("11"), 9, 1),
            2,
            "absent blocks are missing"
        );
    }

    #[test]
    fn sliding_window_needs_only_the_blocks_in_the_window_at_the_end() {
        // A 33-token window over 16-token blocks reaches back cdiv(32, 16) = 2 blocks.
        let g = swa(33, 16);
        assert_eq!(g.blocks_needed_at_end(), Some(2));
        assert_eq!(
            g.longest_hit(&bits("0001100"), 7, 1),
            5,
            "holes before the window are fine"
        );
        assert_eq!(g.longest_hit(&bits("1101011"), 7, 1), 7);
        assert_eq!(
            g.longest_hit(&bits("1101010"), 7, 1),
            2,
            "the prefix itself qualifies"
        );
        assert_eq!(
            g.longest_hit(&bits("1000000"), 7, 1),
            1,
            "a prefix shorter than the window"
        );
        assert_eq!(
            g.longest_hit(&bits("0100000"), 7, 1),
            0,
            "one block is not a window"
        );
        assert_eq!(g.longest_hit(&bits("0111111"), 6, 4), 4, "ends are aligned");
        // A window of one token needs no block at all: any aligned length is servable.
        assert_eq!(swa(1, 16).longest_hit(&bits("000"), 3, 1), 3);
    }

    #[test]
    fn mamba_needs_the_block_at_the_end() {
        let g = mamba(16);
        assert_eq!(g.longest_hit(&bits("0010100"), 7, 1), 5);
        assert_eq!(g.longest_hit(&bits("0010100"), 4, 1), 3);
        assert_eq!(g.longest_hit(&bits("0000000"), 7, 1), 0);
        assert_eq!(g.longest_hit(&bits("1110000"), 7, 2), 2);
    }

    #[test]
    fn a_common_hit_is_one_every_group_can_serve() {
        let groups = [KvCacheGroup::full_attention(16), swa(33, 16)];
        // Full attention holds 6 blocks; the window group only blocks 2..4 and 5.
        let present = vec![bits("1111110"), bits("0011010")];
        assert_eq!(longest_common_hit(&groups, &present, 7 * 16), 4 * 16);
        // The window group would serve 7 blocks, full attention stops it at 3.
        let present = vec![bits("1110000"), bits("1111111")];
        assert_eq!(longest_common_hit(&groups, &present, 7 * 16), 3 * 16);
        // Nothing for the window group: no hit, whatever full attention holds.
        let present = vec![bits("1111111"), bits("0000000")];
        assert_eq!(longest_common_hit(&groups, &present, 7 * 16), 0);

        // Full attention + Mamba: the hit ends where a Mamba state is stored.
        let groups = [KvCacheGroup::full_attention(16), mamba(16)];
        let present = vec![bits("1111111"), bits("0100100")];
        assert_eq!(longest_common_hit(&groups, &present, 7 * 16), 5 * 16);
        assert_eq!(longest_common_hit(&groups, &present, 4 * 16 + 3), 2 * 16);
    }

    #[test]
    fn groups_of_different_block_sizes_meet_at_common_boundaries() {
        // 16- and 32-token blocks: hits are multiples of 32 tokens.
        let groups = [KvCacheGroup::full_attention(16), mamba(32)];
        assert_eq!(alignment_tokens(&groups), 32);
        assert_eq!(hash_block_size(&groups), 16);
        let present = vec![bits("11111"), bits("11")];
        assert_eq!(longest_common_hit(&groups, &present, 5 * 16), 64);
        let present = vec![bits("11100"), bits("11")];
        assert_eq!(longest_common_hit(&groups, &present, 5 * 16), 32);
    }

    #[test]
    fn loads_fetch_only_what_the_hit_needs() {
        assert_eq!(KvCacheGroup::full_attention(16).load_range(2, 9), 2..9);
        assert_eq!(swa(33, 16).load_range(2, 9), 7..9);
        assert_eq!(swa(33, 16).load_range(8, 9), 8..9);
        assert_eq!(swa(1000, 16).load_range(2, 9), 2..9);
        assert_eq!(mamba(16).load_range(2, 9), 8..9);
        assert_eq!(mamba(16).load_range(9, 9), 9..9);
    }

    #[test]
    fn keys_of_a_larger_block_rehash_the_hashes_it_covers() {
        let fine: Vec<BlockHash> = (0..4u8).map(|i| BlockHash([i; 32])).collect();
        assert_eq!(KvCacheGroup::full_attention(16).key_hashes(&fine, 16), fine);
        let coarse = mamba(32).key_hashes(&fine, 16);
        assert_eq!(coarse.len(), 2);
        assert_eq!(coarse[0], grouped_block_hash(&fine[..2]));
        assert_eq!(coarse[1], grouped_block_hash(&fine[2..]));
        // One block's key hash alone is the same.
        assert_eq!(mamba(32).key_hash(&fine, 16, 1), Some(coarse[1]));
        assert_eq!(mamba(32).key_hash(&fine, 16, 2), None);
        assert_eq!(swa(8, 16).key_hash(&fine, 16, 3), Some(fine[3]));
        assert_eq!(
            mamba(32).key_hashes(&fine[..3], 16).len(),
            1,
            "only whole blocks"
        );
    }

    #[test]
    fn a_boundary_state_is_saved_as_the_block_ending_at_it_where_a_hit_can_end() {
        let groups = [KvCacheGroup::full_attention(16), mamba(16)];
        assert_eq!(boundary_state_block(&groups, 1, 144), Ok(8));
        assert_eq!(boundary_state_block(&groups, 1, 16), Ok(0));
        assert_eq!(
            boundary_state_block(&groups, 1, 150),
            Err(BoundarySkip::OffBlock { block_size: 16 })
        );
        assert_eq!(
            boundary_state_block(&groups, 1, 0),
            Err(BoundarySkip::Empty)
        );
        assert_eq!(
            boundary_state_block(&groups, 1, -16),
            Err(BoundarySkip::Empty)
        );
        assert_eq!(
            boundary_state_block(&groups, 0, 144),
            Err(BoundarySkip::NotMamba)
        );
        for bad in [2, -1, i64::MAX] {
            assert_eq!(
                boundary_state_block(&groups, bad, 144),
                Err(BoundarySkip::NoSuchGroup { groups: 2 })
            );
        }
        let swa_groups = [KvCacheGroup::full_attention(16), swa(32, 16)];
        assert_eq!(
            boundary_state_block(&swa_groups, 1, 32),
            Err(BoundarySkip::NotMamba)
        );

        // 64-token Mamba blocks, 16-token attention blocks: a sub-block boundary (vLLM's
        // finer prefix_match_unit) has no key of kvpool's.
        let coarse = [KvCacheGroup::full_attention(16), mamba(64)];
        assert_eq!(boundary_state_block(&coarse, 1, 128), Ok(1));
        assert_eq!(
            boundary_state_block(&coarse, 1, 144),
            Err(BoundarySkip::OffBlock { block_size: 64 })
        );
        // Mamba blocks smaller than the attention blocks: only common boundaries.
        let fine = [KvCacheGroup::full_attention(32), mamba(16)];
        assert_eq!(boundary_state_block(&fine, 1, 64), Ok(3));
        assert_eq!(
            boundary_state_block(&fine, 1, 48),
            Err(BoundarySkip::Unaligned { alignment: 32 })
        );
        let message = BoundarySkip::OffBlock { block_size: 64 }.to_string();
        assert!(message.contains("64-token blocks"), "{message}");
    }

    #[test]
    fn groups_round_trip_through_the_layout_json() {
        let groups = vec![KvCacheGroup::full_attention(16), swa(128, 16), mamba(32)];
        let json = serde_json::to_string(&groups).unwrap();
        assert_eq!(
            json,
            r#"[{"kind":"full_attention","block_size":16},{"kind":"sliding_window","sliding_window":128,"block_size":16},{"kind":"mamba","block_size":32}]"#
        );
        let back: Vec<KvCacheGroup> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, groups);
        assert!(swa(0, 16).validate(1).is_err());
        assert!(KvCacheGroup::full_attention(0).validate(0).is_err());
    }
}
