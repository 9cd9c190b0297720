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

    use kvpool_connector::{Device, EngineLayout, KvRole, TensorDesc};

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

    /// The median of `v`.
    pub fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
}
