//! Trace replay: how many prompt tokens a pool of a given size would serve
//! from cache.
//!
//! `kvpool replay` feeds a request trace (Mooncake's FAST'25 format: one JSON
//! object per line with `input_length` and `hash_ids`, one hash per block) in
//! file order through the same [`EvictionPolicy`] objects the backends use, so
//! the hit ratio measured here is the one a pool of that capacity delivers.
//!
//! A block counts as a hit only while every earlier block of its request hit:
//! attention state is a prefix, so a cached block after a missing one cannot
//! be reused. Blocks reach the policy as the backends hand them over: one
//! request's chain in prefix order, each block with its parent as the
//! [`EvictionPolicy::touch_after`] / [`EvictionPolicy::insert_after`] hint.
//!
//! [`workload`](super::workload) generates traces (multi-turn chats, shared system prompts,
//! agents) to check a policy beyond one recorded workload.

use std::collections::HashSet;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use kvpool::error::{Error, ErrorKind, Result};
use kvpool::eviction::{policy_by_name, EvictionPolicy, Watermark, DEFAULT_POLICY};

/// One request of a trace.
///
/// Other fields of a trace line (`output_length`, ...) are ignored: the
/// replay only needs the prompt's length and blocks, and its arrival time
/// when asked to follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival time in milliseconds since the trace's start, if the trace
    /// records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Prompt length in tokens.
    pub input_length: u64,
    /// One hash per block of the prompt, in prompt order.
    pub hash_ids: Vec<u64>,
}

/// Streams [`TraceRequest`]s out of a JSON-lines trace.
///
/// Blank lines are skipped. A malformed line yields one
/// [`ErrorKind::InvalidArgument`] error naming its line number, and reading
/// goes on with the next line; an I/O error ends the stream.
#[derive(Debug)]
pub struct TraceReader<R> {
    reader: R,
    // Reused across lines so a long trace is not one allocation per line.
    buf: Vec<u8>,
    line: u64,
    done: bool,
}

impl<R: BufRead> TraceReader<R> {
    /// A reader over `reader`, positioned at its first line.
    pub fn new(reader: R) -> Self {
        TraceReader {
            reader,
            buf: Vec::new(),
            line: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<TraceRequest>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            // Bytes rather than `read_line`, so a line of invalid UTF-8 is
            // reported by serde as that line's error instead of an I/O error
            // that would end the stream.
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line += 1;
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(parse_line(&self.buf, self.line));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A failing reader tends to keep failing; one error is enough.
                    self.done = true;
                    return Some(Err(Error::new(
                        ErrorKind::Unexpected,
                        format!("cannot read trace after line {}", self.line),
                    )
                    .with_operation("replay")
                    .set_source(e)));
                }
            }
        }
        None
    }
}

fn parse_line(bytes: &[u8], line: u64) -> Result<TraceRequest> {
    // serde's derived structs also accept `[input_length, hash_ids]`; a trace
    // line that is not an object is far more likely a wrong file than that.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::invalid_argument(format!(
            "trace line {line}: expected a JSON object with input_length and hash_ids"
        ))
        .with_operation("replay")
        .with_context("line", line));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde_json positions are relative to the line we handed it; the
        // file's line number is what the user needs, so keep only the column.
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = full.strip_suffix(&suffix).unwrap_or(&full);
        let what = match e.classify() {
            serde_json::error::Category::Data => what.to_string(),
            _ => format!("invalid JSON: {what}"),
        };
        Error::invalid_argument(format!("trace line {line}: {what}"))
            .with_operation("replay")
            .with_context("line", line)
            .with_context("column", e.column())
    })
}

/// Streams the requests of a JSON-lines trace; see [`TraceReader`].
pub fn read_trace<R: BufRead>(reader: R) -> TraceReader<R> {
    TraceReader::new(reader)
}

/// What to replay a trace against.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Pool capacity in blocks; `None` is an unbounded pool.
    pub capacity_blocks: Option<u64>,
    /// Tokens per block (Mooncake's trace uses 512).
    pub block_tokens: u64,
    /// Eviction policy name, as [`policy_by_name`] accepts it (default:
    /// [`DEFAULT_POLICY`], what the backends use).
    pub policy: String,
    /// Batch eviction at a high watermark; `None` evicts one block at a time,
    /// only when the pool is full.
    pub watermark: Option<Watermark>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            capacity_blocks: None,
            block_tokens: 512,
            policy: DEFAULT_POLICY.to_string(),
            watermark: None,
        }
    }
}

impl ReplayOptions {
    /// Sets the capacity from a token count, rounded down to whole blocks of
    /// the current `block_tokens`; errors when that is not even one block.
    pub fn with_capacity_tokens(mut self, capacity_tokens: u64) -> Result<Self> {
        self.capacity_blocks = Some(capacity_tokens_to_blocks(
            capacity_tokens,
            self.block_tokens,
        )?);
        Ok(self)
    }

    /// Checks the options; the error names the offending option.
    pub fn validate(&self) -> Result<()> {
        if self.block_tokens == 0 {
            return Err(Error::invalid_argument("--block-tokens must be at least 1"));
        }
        if self.capacity_blocks == Some(0) {
            return Err(Error::invalid_argument(
                "--capacity-blocks must be at least 1 (omit it for an unbounded pool)",
            ));
        }
        if let Some(w) = &self.watermark {
            w.validate()?;
            if self.capacity_blocks.is_none() {
                return Err(Error::invalid_argument(
                    "--watermark needs a capacity (--capacity-tokens or --capacity-blocks)",
                ));
            }
        }
        policy_by_name::<u64>(&self.policy)?;
        Ok(())
    }
}

/// Whole blocks of `block_tokens` that fit in `capacity_tokens` (rounded
/// down); errors when `block_tokens` is 0 or not even one block fits, since a
/// zero capacity would silently mean "cache nothing".
pub fn capacity_tokens_to_blocks(capacity_tokens: u64, block_tokens: u64) -> Result<u64> {
    if block_tokens == 0 {
        return Err(Error::invalid_argument("--block-tokens must be at least 1"));
    }
    let blocks = capacity_tokens / block_tokens;
    if blocks == 0 {
        return Err(Error::invalid_argument(format!(
            "--capacity-tokens {capacity_tokens} is less than one block of {block_tokens} tokens"
        )));
    }
    Ok(blocks)
}

/// Parses `--watermark HIGH,RATIO` (e.g. `0.9,0.05`) and validates it.
pub fn parse_watermark(s: &str) -> Result<Watermark> {
    let bad = || {
        Error::invalid_argument(format!(
            "--watermark expects HIGH,RATIO such as 0.9,0.05, got {s:?}"
        ))
    };
    let (high, ratio) = s.split_once(',').ok_or_else(bad)?;
    let w = Watermark {
        high_watermark_ratio: high.trim().parse().map_err(|_| bad())?,
        eviction_ratio: ratio.trim().parse().map_err(|_| bad())?,
    };
    w.validate()?;
    Ok(w)
}

/// The outcome of a replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Requests replayed.
    pub requests: u64,
    /// Σ `input_length`.
    pub input_tokens: u64,
    /// Σ min(hit blocks × block tokens, `input_length`).
    pub hit_tokens: u64,
    /// Σ blocks (`hash_ids` entries).
    pub blocks: u64,
    /// Σ prefix-hit blocks.
    pub hit_blocks: u64,
    /// `hit_tokens / input_tokens` (0 for an empty trace).
    pub token_hit_ratio: f64,
    /// `hit_blocks / blocks` (0 for an empty trace).
    pub block_hit_ratio: f64,
    /// The policy's canonical name.
    pub policy: String,
    /// Capacity in blocks; `None` (JSON `null`) is unbounded.
    pub capacity_blocks: Option<u64>,
    /// Blocks evicted.
    pub evictions: u64,
}

/// Replays requests one at a time, so a caller can report progress.
#[derive(Debug)]
pub struct Replayer {
    policy: Box<dyn EvictionPolicy<u64>>,
    // The policy has no membership query, and `touch` would reorder; a set
    // answers "is it cached?" without side effects.
    cached: HashSet<u64>,
    capacity: Option<u64>,
    block_tokens: u64,
    watermark: Option<Watermark>,
    requests: u64,
    input_tokens: u64,
    hit_tokens: u64,
    blocks: u64,
    hit_blocks: u64,
    evictions: u64,
}

impl Replayer {
    /// An empty pool as `opts` describe it; errors if they do not validate.
    pub fn new(opts: &ReplayOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Replayer {
            policy: policy_by_name::<u64>(&opts.policy)?,
            cached: HashSet::new(),
            capacity: opts.capacity_blocks,
            block_tokens: opts.block_tokens,
            watermark: opts.watermark,
            requests: 0,
            input_tokens: 0,
            hit_tokens: 0,
            blocks: 0,
            hit_blocks: 0,
            evictions: 0,
        })
    }

    /// Looks `req` up and then caches its blocks; returns its prefix-hit
    /// blocks.
    ///
    /// Lookup and insertion share one walk: until the first miss every block
    /// is present and only touched, so nothing is evicted before the hit
    /// count is final, and touching hits in walk order leaves the same
    /// recency order as a separate lookup pass followed by an insert pass.
    pub fn feed(&mut self, req: &TraceRequest) -> u64 {
        let mut hits = 0u64;
        let mut in_prefix = true;
        let mut parent = None;
        for &block in &req.hash_ids {
            if self.cached.contains(&block) {
                if in_prefix {
                    hits += 1;
                }
                self.policy.touch_after(&block, parent.as_ref());
            } else {
                in_prefix = false;
                self.make_room();
                self.cached.insert(block);
                self.policy.insert_after(block, 1, parent.as_ref());
            }
            parent = Some(block);
        }
        self.requests += 1;
        self.input_tokens += req.input_length;
        self.hit_tokens += hits.saturating_mul(self.block_tokens).min(req.input_length);
        self.blocks += req.hash_ids.len() as u64;
        self.hit_blocks += hits;
        hits
    }

    /// Frees room for one more block.
    fn make_room(&mut self) {
        let Some(capacity) = self.capacity else {
            return;
        };
        let used = self.cached.len() as u64;
        if let Some(w) = self.watermark {
            // Evicting before the insert, rather than once usage has passed
            // the mark, keeps the incoming block out of its own eviction pass.
            if used + 1 > capacity || w.should_evict(used + 1, capacity) {
                for _ in 0..w.bytes_to_free(capacity) {
                    if !self.evict_one() {
                        break;
                    }
                }
            }
        }
        // Without a watermark this is the whole policy; with one it only
        // guards capacity should a pass have freed too little.
        while self.cached.len() as u64 >= capacity {
            if !self.evict_one() {
                break;
            }
        }
    }

    fn evict_one(&mut self) -> bool {
        match self.policy.pop_victim() {
            Some((victim, _)) => {
                self.cached.remove(&victim);
                self.evictions += 1;
                true
            }
            None => false,
        }
    }

    /// Blocks cached right now.
    #[cfg(test)]
    pub fn cached_blocks(&self) -> u64 {
        self.cached.len() as u64
    }

    /// Whether `block` is cached right now (does not count as an access).
    #[cfg(test)]
    pub fn is_cached(&self, block: u64) -> bool {
        self.cached.contains(&block)
    }

    /// The totals so far.
    pub fn report(&self) -> ReplayReport {
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        ReplayReport {
            requests: self.requests,
            input_tokens: self.input_tokens,
            hit_tokens: self.hit_tokens,
            blocks: self.blocks,
            hit_blocks: self.hit_blocks,
            token_hit_ratio: ratio(self.hit_tokens, self.input_tokens),
            block_hit_ratio: ratio(self.hit_blocks, self.blocks),
            policy: self.policy.name().to_string(),
            capacity_blocks: self.capacity,
            evictions: self.evictions,
        }
    }
}

/// Replays a whole JSON-lines trace; stops at the first malformed line.
#[cfg(test)]
pub fn replay(reader: impl BufRead, opts: &ReplayOptions) -> Result<ReplayReport> {
    let mut replayer = Replayer::new(opts)?;
    for req in read_trace(reader) {
        replayer.feed(&req?);
    }
    Ok(replayer.report())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(input_length: u64, hash_ids: &[u64]) -> TraceRequest {
        TraceRequest {
            timestamp: None,
            input_length,
            hash_ids: hash_ids.to_vec(),
        }
    }

    /// LRU: the replayer's own semantics are easiest to check against it.
    fn opts(capacity_blocks: Option<u64>) -> ReplayOptions {
        ReplayOptions {
            capacity_blocks,
            policy: "lru".into(),
            ..ReplayOptions::default()
        }
    }

    fn trace_path() -> String {
        std::env::var("KVPOOL_TRACE").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../data/conversation_trace.jsonl"
            )
            .to_string()
        })
    }

    fn replay_real_trace(opts: &ReplayOptions) -> ReplayReport {
        let path = trace_path();
        // A missing trace must fail loudly: skipping would let CI go green
        // without ever checking the published hit ratios.
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "cannot open the Mooncake trace at {path}: {e}; it ships in the \
                 repository's data/ folder, or set KVPOOL_TRACE to the trace's path"
            )
        });
        replay(std::io::BufReader::new(file), opts).unwrap()
    }

    #[test]
    fn a_miss_ends_the_hit_run() {
        let mut r = Replayer::new(&opts(None)).unwrap();
        assert_eq!(r.feed(&req(1536, &[1, 2, 3])), 0);
        // Block 3 is cached but follows the missing 9, so it is no hit.
        assert_eq!(r.feed(&req(1536, &[1, 9, 3])), 1);
        assert_eq!(r.feed(&req(1536, &[1, 9, 3])), 3);
        let rep = r.report();
        assert_eq!(rep.requests, 3);
        assert_eq!(rep.blocks, 9);
        assert_eq!(rep.hit_blocks, 4);
        assert_eq!(rep.input_tokens, 3 * 1536);
        assert_eq!(rep.hit_tokens, 4 * 512);
        assert_eq!(rep.block_hit_ratio, 4.0 / 9.0);
        assert_eq!(rep.token_hit_ratio, 2048.0 / 4608.0);
        assert_eq!(rep.evictions, 0);
        assert_eq!(rep.capacity_blocks, None);
    }

    #[test]
    fn hit_tokens_are_capped_by_input_length() {
        let mut r = Replayer::new(&opts(None)).unwrap();
        r.feed(&req(700, &[1, 2]));
        r.feed(&req(700, &[1, 2]));
        // A longer prompt sharing the partial block: 2 hits, 1024 tokens.
        r.feed(&req(1100, &[1, 2, 3]));
        let rep = r.report();
        assert_eq!(rep.hit_tokens, 700 + 1024);
        assert_eq!(rep.input_tokens, 2500);
        assert_eq!(rep.token_hit_ratio, 1724.0 / 2500.0);
    }

    #[test]
    fn lru_evicts_one_block_at_a_time_least_recent_first() {
        let mut r = Replayer::new(&opts(Some(2))).unwrap();
        r.feed(&req(512, &[1]));
        r.feed(&req(512, &[2]));
        assert_eq!(r.feed(&req(512, &[1])), 1); // 1 is now more recent than 2
        r.feed(&req(512, &[3])); // full: evicts 2 only
        assert_eq!(r.cached_blocks(), 2);
        assert!(r.is_cached(1) && r.is_cached(3) && !r.is_cached(2));
        assert_eq!(r.feed(&req(512, &[1])), 1);
        assert_eq!(r.feed(&req(512, &[2])), 0); // evicts 3
        assert!(!r.is_cached(3));
        let rep = r.report();
        assert_eq!(rep.evictions, 2);
        assert_eq!(rep.hit_blocks, 2);
        assert_eq!(rep.policy, "lru");
        assert_eq!(rep.capacity_blocks, Some(2));
    }

    #[test]
    fn request_longer_than_capacity_keeps_its_tail() {
        let mut r = Replayer::new(&opts(Some(2))).unwrap();
        r.feed(&req(2048, &[1, 2, 3, 4]));
        assert!(r.is_cached(3) && r.is_cached(4));
        assert_eq!(r.cached_blocks(), 2);
        // 1 was evicted, so nothing of this prefix hits even though 3, 4 are cached.
        assert_eq!(r.feed(&req(2048, &[1, 2, 3, 4])), 0);
        assert_eq!(r.report().evictions, 6);
    }

    #[test]
    fn watermark_evicts_a_batch_before_passing_the_mark() {
        let o = ReplayOptions {
            watermark: Some(Watermark {
                high_watermark_ratio: 0.5,
                eviction_ratio: 0.3,
            }),
            ..opts(Some(10))
        };
        let mut r = Replayer::new(&o).unwrap();
        for b in 1..=5 {
            r.feed(&req(512, &[b]));
        }
        assert_eq!(r.report().evictions, 0);
        assert_eq!(r.cached_blocks(), 5);
        // A 6th block would pass 5 = 0.5 × 10: one pass frees 3 = 0.3 × 10.
        r.feed(&req(512, &[6]));
        assert_eq!(r.report().evictions, 3);
        assert_eq!(r.cached_blocks(), 3);
        assert!(!r.is_cached(1) && !r.is_cached(2) && !r.is_cached(3));
        assert!(r.is_cached(4) && r.is_cached(5) && r.is_cached(6));
        r.feed(&req(512, &[7]));
        r.feed(&req(512, &[8]));
        assert_eq!(r.report().evictions, 3);
        r.feed(&req(512, &[9]));
        assert_eq!(r.report().evictions, 6);
        assert_eq!(r.cached_blocks(), 3);
    }

    #[test]
    fn watermark_never_lets_usage_exceed_capacity() {
        // high = 1.0 never passes the mark, so only the capacity guard evicts.
        let o = ReplayOptions {
            watermark: Some(Watermark {
                high_watermark_ratio: 1.0,
                eviction_ratio: 0.5,
            }),
            ..opts(Some(4))
        };
        let mut r = Replayer::new(&o).unwrap();
        for b in 0..20 {
            r.feed(&req(512, &[b, b + 100]));
            assert!(r.cached_blocks() <= 4);
        }
        // Tiny pool: 0.9 × 1 rounds to 0, so every insert runs a pass.
        let o = ReplayOptions {
            watermark: Some(Watermark::default()),
            ..opts(Some(1))
        };
        let mut r = Replayer::new(&o).unwrap();
        r.feed(&req(1536, &[1, 2, 3]));
        assert_eq!(r.cached_blocks(), 1);
        assert!(r.is_cached(3));
    }

    #[test]
    fn reader_skips_blank_lines_and_ignores_extra_fields() {
        let text = "\n{\"timestamp\": 25, \"input_length\": 600, \"output_length\": 5, \
                    \"hash_ids\": [7, 8]}\n   \n\r\n{\"input_length\": 1, \"hash_ids\": []}";
        let got: Vec<_> = read_trace(text.as_bytes()).collect::<Result<_>>().unwrap();
        let first = TraceRequest {
            timestamp: Some(25),
            ..req(600, &[7, 8])
        };
        assert_eq!(got, vec![first, req(1, &[])]);
    }

    #[test]
    fn malformed_lines_name_their_line_number() {
        let text = "{\"input_length\": 1, \"hash_ids\": [1]}\n\
                    \n\
                    {\"input_length\": 1}\n\
                    {\"input_length\": \"x\", \"hash_ids\": [1]}\n\
                    {\"input_length\": 1, \"hash_ids\": [-1]}\n\
                    {not json\n\
                    [1, 2]\n\
                    {\"input_length\": 2, \"hash_ids\": [2]}\n";
        let items: Vec<_> = read_trace(text.as_bytes()).collect();
        assert_eq!(items.len(), 7);
        assert_eq!(items[0].as_ref().unwrap(), &req(1, &[1]));
        assert_eq!(items[6].as_ref().unwrap(), &req(2, &[2]));
        let expect = [
            (3, "missing field `hash_ids`"),
            (4, "invalid type: string \"x\""),
            (5, "invalid value: integer `-1`"),
            (6, "invalid JSON"),
            (7, "expected a JSON object"),
        ];
        for ((line, what), item) in expect.iter().zip(&items[1..6]) {
            let err = item.as_ref().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            let msg = err.to_string();
            assert!(msg.contains(&format!("trace line {line}: ")), "{msg}");
            assert!(msg.contains(what), "{msg}");
            // Only the file's line number: serde's per-line "line 1" would mislead.
            assert!(!msg.contains("at line 1 column"), "{msg}");
        }
        let err = replay(text.as_bytes(), &opts(None)).unwrap_err();
        assert!(err.to_string().contains("trace line 3"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_that_lines_error_not_the_end() {
        let mut text = b"{\"input_length\": 1, \"hash_ids\": [\xff]}\n".to_vec();
        text.extend_from_slice(b"{\"input_length\": 1, \"hash_ids\": [1]}\n");
        let items: Vec<_> = read_trace(&text[..]).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("trace line 1"));
        assert!(items[1].is_ok());
    }

    #[test]
    fn options_are_validated() {
        let bad = |o: ReplayOptions| Replayer::new(&o).unwrap_err().to_string();
        assert!(bad(ReplayOptions {
            block_tokens: 0,
            ..ReplayOptions::default()
        })
        .contains("--block-tokens"));
        assert!(bad(opts(Some(0))).contains("--capacity-blocks"));
        assert!(bad(ReplayOptions {
            policy: "fifo".into(),
            ..ReplayOptions::default()
        })
        .contains("lru"));
        assert!(bad(ReplayOptions {
            capacity_blocks: Some(10),
            watermark: Some(Watermark {
                high_watermark_ratio: 0.9,
                eviction_ratio: 0.0,
            }),
            ..ReplayOptions::default()
        })
        .contains("eviction_ratio"));
        assert!(bad(ReplayOptions {
            watermark: Some(Watermark::default()),
            ..ReplayOptions::default()
        })
        .contains("capacity"));
        assert_eq!(capacity_tokens_to_blocks(3_000_000, 512).unwrap(), 5859);
        assert!(capacity_tokens_to_blocks(511, 512).is_err());
        assert!(capacity_tokens_to_blocks(512, 0).is_err());
        let o = ReplayOptions::default().with_capacity_tokens(1025).unwrap();
        assert_eq!(o.capacity_blocks, Some(2));
    }

    #[test]
    fn watermark_flag_parses() {
        assert_eq!(
            parse_watermark("0.9, 0.05").unwrap(),
            Watermark {
                high_watermark_ratio: 0.9,
                eviction_ratio: 0.05,
            }
        );
        assert!(parse_watermark("0.9").is_err());
        assert!(parse_watermark("a,b").is_err());
        assert!(parse_watermark("1.5,0.05")
            .unwrap_err()
            .to_string()
            .contains("eviction_high_watermark_ratio"));
    }

    #[test]
    fn report_serializes_the_cli_fields() {
        let rep = replay(
            "{\"input_length\": 512, \"hash_ids\": [1]}\n".as_bytes(),
            &opts(Some(8)),
        )
        .unwrap();
        let json = serde_json::to_value(&rep).unwrap();
        for key in [
            "requests",
            "token_hit_ratio",
            "block_hit_ratio",
            "policy",
            "capacity_blocks",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["capacity_blocks"], 8);
        assert_eq!(json["policy"], "lru");
        let empty = replay(&b""[..], &opts(None)).unwrap();
        assert_eq!(empty.token_hit_ratio, 0.0);
        assert_eq!(
            serde_json::to_value(&empty).unwrap()["capacity_blocks"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn real_trace_unbounded_pool_hits_0_374() {
        let rep = replay_real_trace(&opts(None));
        assert_eq!(rep.requests, 12_031);
        assert_eq!(format!("{:.3}", rep.token_hit_ratio), "0.374", "{rep:?}");
        assert_eq!(rep.evictions, 0);
    }

    #[test]
    fn real_trace_lru_3m_tokens_hits_0_138() {
        let o = opts(None).with_capacity_tokens(3_000_000).unwrap();
        assert_eq!(o.capacity_blocks, Some(5_859));
        let rep = replay_real_trace(&o);
        assert_eq!(format!("{:.3}", rep.token_hit_ratio), "0.138", "{rep:?}");
    }

    #[test]
    fn real_trace_chain_3m_tokens_beats_lru_by_15_percent() {
        let o = ReplayOptions::default()
            .with_capacity_tokens(3_000_000)
            .unwrap();
        let rep = replay_real_trace(&o);
        assert_eq!(rep.policy, "chain");
        // LRU: 0.138; the target is +15%.
        assert!(rep.token_hit_ratio >= 0.159, "{rep:?}");
    }

    #[test]
    fn chain_policy_new_blocks_leave_leaf_first() {
        let o = ReplayOptions {
            capacity_blocks: Some(3),
            ..ReplayOptions::default()
        };
        let mut r = Replayer::new(&o).unwrap();
        r.feed(&req(1536, &[1, 2, 3]));
        // A fourth block evicts the chain's leaf, not its root.
        r.feed(&req(512, &[9]));
        assert!(r.is_cached(1) && r.is_cached(2) && !r.is_cached(3));
        assert_eq!(r.feed(&req(1536, &[1, 2, 3])), 2);
    }

    /// The chain policy against LRU on generated workloads, small enough for
    /// a debug build: never more than 1% worse, and better where one-off
    /// blocks crowd out shared prefixes.
    #[test]
    fn chain_policy_holds_up_on_generated_workloads() {
        for w in crate::replay::workload::Workload::ALL {
            let trace = w.generate(11, 0.1).unwrap();
            let unique: HashSet<u64> = trace.iter().flat_map(|r| r.hash_ids.clone()).collect();
            for fraction in [0.05, 0.2] {
                let blocks = ((unique.len() as f64 * fraction) as u64).max(1);
                let run = |policy: &str| {
                    let mut r = Replayer::new(&ReplayOptions {
                        policy: policy.into(),
                        ..opts(Some(blocks))
                    })
                    .unwrap();
                    trace.iter().for_each(|q| {
                        r.feed(q);
                    });
                    r.report().token_hit_ratio
                };
                let (lru, chain) = (run("lru"), run("chain"));
                assert!(
                    chain >= lru * 0.99,
                    "{w} at {blocks} blocks: chain {chain:.4} vs lru {lru:.4}"
                );
            }
        }
    }
}
