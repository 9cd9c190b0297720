//! Shared helpers for kvpool's criterion benchmarks (see `benches/`).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that owns a Mooncake segment: it prints `ready` once the segment is
/// mounted and keeps it until its stdin closes, which dropping this does.
#[derive(Debug)]
pub struct SegmentOwner(Child);

impl SegmentOwner {
    /// Starts `command` with piped stdin and stdout and waits for its `ready` line.
    ///
    /// # Panics
    /// When the process cannot start or says anything else first: a bench cannot go on.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the segment owner");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the owner's first line");
        assert_eq!(line.trim(), "ready", "the owner process did not start");
        SegmentOwner(child)
    }
}

impl Drop for SegmentOwner {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The owner side of [`SegmentOwner`]: says `ready`, then blocks until stdin closes. Call it
/// outside the runtime's `block_on`, so the runtime's workers keep the segment alive meanwhile.
pub fn announce_ready_and_wait_for_stdin() {
    println!("ready");
    std::io::stdout().flush().expect("flush stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// The connector benches' engine step: a small model's KV (16 layers, 8 KV heads, head size
/// 128 for K and V, 16 tokens per block, fp16: 64 KiB per layer page, 1 MiB per block).
pub mod step {
    use std::time::Duration;

    use kvpool::BlockHash;
    use kvpool_connector::{
        Device, EngineLayout, KvRole, LoadPlan, SavePlan, StepMeta, TensorDesc,
    };

    pub const LAYERS: usize = 16;
    pub const HEADS: usize = 8;
    pub const TOKENS: usize = 16;
    pub const CONTENT: usize = 2 * 128;
    pub const ELEM: usize = 2;
    /// One layer's page of one block.
    pub const PAGE: usize = HEADS * TOKENS * CONTENT * ELEM;
    /// One block's value.
    pub const VALUE: usize = LAYERS * PAGE;
    /// Blocks a step saves or loads.
    pub const STEP_BLOCKS: usize = 64;

    /// The engine layout of a single-rank instance of this model.
    pub fn layout(model: &str) -> EngineLayout {
        EngineLayout {
            model: model.into(),
            block_size: TOKENS,
            tp_size: 1,
            tp_rank: 0,
            pp_size: 1,
            pp_rank: 0,
            dp_rank: 0,
            num_kv_heads: HEADS as u32,
            use_mla: false,
            role: KvRole::Both,
            groups: vec![],
            kv_events: false,
            stage_layers: vec![],
        }
    }

    /// One `[blocks, heads, tokens, content]` tensor per layer over `cache_blocks` blocks at
    /// `base`, layers one after the other: head-major pages (vLLM's CPU layout, LBHNC), or
    /// token-major ones (its GPU default, LBNHC) with `token_major`.
    pub fn tensors(base: usize, cache_blocks: usize, token_major: bool) -> Vec<TensorDesc> {
        let (head, token) = if token_major {
            (CONTENT, HEADS * CONTENT)
        } else {
            (TOKENS * CONTENT, CONTENT)
        };
        (0..LAYERS)
            .map(|l| TensorDesc {
                layer: format!("model.layers.{l}.attn"),
                ptr: base + l * cache_blocks * PAGE,
                shape: vec![cache_blocks, HEADS, TOKENS, CONTENT],
                strides: vec![(PAGE / ELEM) as isize, head as isize, token as isize, 1],
                elem_size: ELEM,
                device: Device::Host,
            })
            .collect()
    }

    /// The benches' block hash number `i`: `i` little-endian in the first 8 bytes, then `tag`
    /// (which keeps one rig's hashes apart from another's), then zeros.
    pub fn block_hash(tag: u8, i: u64) -> BlockHash {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        h[8] = tag;
        BlockHash(h)
    }

    /// Hashes `start..start + n` of [`block_hash`] in a plan's wire form: hex, concatenated.
    pub fn hashes_hex(tag: u8, start: u64, n: usize) -> String {
        (start..start + n as u64)
            .map(|i| block_hash(tag, i).to_hex())
            .collect()
    }

    /// A save of `block_ids` under `hashes` (hex, as [`hashes_hex`] builds them) from the
    /// request's first block on, in KV-cache group 0, without the KV events' extras.
    pub fn save_plan(req_id: &str, block_ids: Vec<u32>, hashes: String) -> SavePlan {
        SavePlan {
            req_id: req_id.into(),
            block_ids,
            hashes,
            ..SavePlan::default()
        }
    }

    /// The wire form of a step that saves `plan` and does nothing else.
    pub fn save_meta(plan: SavePlan) -> Vec<u8> {
        StepMeta {
            saves: vec![plan],
            ..StepMeta::default()
        }
        .encode()
    }

    /// The wire form of a step that only loads, synchronously, `hashes` (hex) into
    /// `block_ids` for request `req_id`, every block in KV-cache group 0.
    pub fn load_meta(req_id: &str, block_ids: Vec<u32>, hashes: String) -> Vec<u8> {
        StepMeta {
            loads: vec![LoadPlan {
                req_id: req_id.into(),
                block_ids,
                hashes,
                is_async: false,
                groups: vec![],
            }],
            ..StepMeta::default()
        }
        .encode()
    }

    /// The median of `v`.
    pub fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
}
