//! `kvpool replay --sweep`: token hit ratio per capacity and policy.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::trace::TraceRequest;
use super::trace::{capacity_tokens_to_blocks, ReplayOptions, ReplayReport, Replayer};
use kvpool::Error;
use serde::Serialize;

/// One pool size of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capacity {
    /// No eviction: the most any policy can hit.
    Unbounded,
    /// A capacity given in tokens, rounded down to whole blocks.
    Blocks { tokens: u64, blocks: u64 },
}

impl Capacity {
    fn blocks(self) -> Option<u64> {
        match self {
            Capacity::Unbounded => None,
            Capacity::Blocks { blocks, .. } => Some(blocks),
        }
    }
}

/// Parses `1e5,1e6,3e6` (also `100000`, `3M`, `100k`, `1_000_000`) into
/// capacities sorted by size, each at least one block.
pub(crate) fn parse_capacities(list: &str, block_tokens: u64) -> kvpool::Result<Vec<Capacity>> {
    let mut out = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        let tokens = parse_tokens(item).ok_or_else(|| {
            Error::invalid_argument(format!(
                "--sweep: {item:?} is not a token count; expected a list such as 1e5,1e6,3e6,1e7,5e7"
            ))
        })?;
        let blocks = capacity_tokens_to_blocks(tokens, block_tokens).map_err(|_| {
            Error::invalid_argument(format!(
                "--sweep: {item} tokens is less than one block of {block_tokens} tokens"
            ))
        })?;
        out.push(Capacity::Blocks { tokens, blocks });
    }
    out.sort_by_key(|c| c.blocks());
    // Two token counts that round to the same blocks are one pool size.
    out.dedup_by_key(|c| c.blocks());
    Ok(out)
}

fn parse_tokens(item: &str) -> Option<u64> {
    let item = item.replace('_', "");
    let (number, scale) = match item.char_indices().last()? {
        (i, 'k' | 'K') => (&item[..i], 1e3),
        (i, 'm' | 'M') => (&item[..i], 1e6),
        (i, 'g' | 'G') => (&item[..i], 1e9),
        _ => (item.as_str(), 1.0),
    };
    let x = number.parse::<f64>().ok()? * scale;
    // Whole tokens only: "1.5" is more likely a typo than a capacity.
    (x.is_finite() && x >= 1.0 && x.fract() == 0.0 && x < u64::MAX as f64).then_some(x as u64)
}

/// One cell of the table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Point {
    /// `None` (JSON null) for the unbounded pool.
    pub capacity_tokens: Option<u64>,
    pub capacity_blocks: Option<u64>,
    pub policy: String,
    pub token_hit_ratio: f64,
    pub block_hit_ratio: f64,
    /// `token_hit_ratio` as a fraction of the unbounded pool's.
    pub of_max: f64,
    pub evictions: u64,
}

/// A whole sweep, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Table {
    pub requests: u64,
    pub input_tokens: u64,
    pub block_tokens: u64,
    /// Token hit ratio of an unbounded pool: the most any policy reaches.
    pub max_token_hit_ratio: f64,
    pub policies: Vec<String>,
    /// Capacities ascending, then policies in the order given.
    pub points: Vec<Point>,
    /// Wall time of all the replays.
    pub seconds: f64,
}

impl Table {
    /// The point for a capacity (in blocks) and policy.
    pub fn get(&self, blocks: Option<u64>, policy: &str) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.capacity_blocks == blocks && p.policy == policy)
    }

    /// The capacities, ascending.
    pub fn capacities(&self) -> Vec<(Option<u64>, Option<u64>)> {
        let mut caps: Vec<_> = self
            .points
            .iter()
            .map(|p| (p.capacity_tokens, p.capacity_blocks))
            .collect();
        caps.dedup();
        caps
    }
}

/// Replays every (capacity, policy) pair and the unbounded pool, on all
/// cores: each replay is independent and single-threaded.
pub(crate) fn run(
    requests: &[TraceRequest],
    base: &ReplayOptions,
    capacities: &[Capacity],
    policies: &[String],
) -> kvpool::Result<Table> {
    let started = Instant::now();
    // Job 0 is the unbounded pool: no eviction, so any policy will do and
    // a watermark has nothing to act on.
    let mut jobs = vec![ReplayOptions {
        capacity_blocks: None,
        watermark: None,
        ..base.clone()
    }];
    for &capacity in capacities {
        for policy in policies {
            jobs.push(ReplayOptions {
                capacity_blocks: capacity.blocks(),
                policy: policy.clone(),
                watermark: base.watermark.filter(|_| capacity.blocks().is_some()),
                ..base.clone()
            });
        }
    }
    for job in &jobs {
        job.validate()?;
    }
    let bar = crate::progress(
        (jobs.len() * requests.len()) as u64,
        &format!("{} replays", jobs.len()),
    );
    let next = AtomicUsize::new(0);
    let reports: Mutex<Vec<Option<ReplayReport>>> = Mutex::new(vec![None; jobs.len()]);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(opts) = jobs.get(i) else { break };
                let mut replayer = Replayer::new(opts).expect("validated above");
                for chunk in requests.chunks(1024) {
                    for request in chunk {
                        replayer.feed(request);
                    }
                    bar.inc(chunk.len() as u64);
                }
                reports.lock().expect("no replay panics")[i] = Some(replayer.report());
            });
        }
    });
    bar.finish_and_clear();
    let reports: Vec<ReplayReport> = reports
        .into_inner()
        .expect("no replay panics")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect();
    let max = &reports[0];
    let of_max = |x: f64| {
        if max.token_hit_ratio > 0.0 {
            x / max.token_hit_ratio
        } else {
            0.0
        }
    };
    let mut points = Vec::new();
    let mut rest = reports[1..].iter();
    for &capacity in capacities {
        for policy in policies {
            let r = rest.next().expect("one report per job");
            points.push(Point {
                capacity_tokens: match capacity {
                    Capacity::Unbounded => None,
                    Capacity::Blocks { tokens, .. } => Some(tokens),
                },
                capacity_blocks: capacity.blocks(),
                policy: policy.clone(),
                token_hit_ratio: r.token_hit_ratio,
                block_hit_ratio: r.block_hit_ratio,
                of_max: of_max(r.token_hit_ratio),
                evictions: r.evictions,
            });
        }
    }
    Ok(Table {
        requests: max.requests,
        input_tokens: max.input_tokens,
        block_tokens: base.block_tokens,
        max_token_hit_ratio: max.token_hit_ratio,
        policies: policies.to_vec(),
        points,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn print(name: &str, table: &Table, plot: Option<&Path>) {
    println!(
        "{name}: {} requests, {} input tokens, {}-token blocks",
        thousands(table.requests),
        thousands(table.input_tokens),
        table.block_tokens
    );
    println!(
        "maximum (unbounded pool): token hit ratio {:.3}",
        table.max_token_hit_ratio
    );
    println!();
    let first = &table.policies[0];
    let mut header = format!("{:>18} {:>10}", "capacity (tokens)", "blocks");
    for policy in &table.policies {
        header.push_str(&format!("  {:>16}", format!("{policy} (% of max)")));
    }
    for policy in &table.policies[1..] {
        header.push_str(&format!("  {:>14}", format!("{policy} vs {first}")));
    }
    println!("{header}");
    for (tokens, blocks) in table.capacities() {
        let mut line = format!(
            "{:>18} {:>10}",
            tokens.map_or("unbounded".into(), thousands),
            blocks.map_or("-".into(), thousands)
        );
        for policy in &table.policies {
            let p = table.get(blocks, policy).expect("a point per cell");
            line.push_str(&format!(
                "  {:>16}",
                format!("{:.3} ({:.1}%)", p.token_hit_ratio, p.of_max * 100.0)
            ));
        }
        let base = table.get(blocks, first).expect("a point per cell");
        for policy in &table.policies[1..] {
            let p = table.get(blocks, policy).expect("a point per cell");
            let change = if base.token_hit_ratio > 0.0 {
                format!(
                    "{:+.1}%",
                    (p.token_hit_ratio / base.token_hit_ratio - 1.0) * 100.0
                )
            } else {
                "-".into()
            };
            line.push_str(&format!("  {change:>14}"));
        }
        println!("{line}");
    }
    println!();
    println!(
        "{} replays in {:.1} s",
        table.points.len() + 1,
        table.seconds
    );
    if let Some(plot) = plot {
        println!("plot written to {}", plot.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_lists_parse_sorted_and_deduplicated() {
        let caps = parse_capacities("3e6, 1e5,1_000_000,1M,100k", 512).unwrap();
        assert_eq!(
            caps,
            vec![
                Capacity::Blocks {
                    tokens: 100_000,
                    blocks: 195
                },
                Capacity::Blocks {
                    tokens: 1_000_000,
                    blocks: 1953
                },
                Capacity::Blocks {
                    tokens: 3_000_000,
                    blocks: 5859
                },
            ]
        );
        for bad in ["", "1e5,", "abc", "1.5", "-1e5", "1e400", "0"] {
            let err = parse_capacities(bad, 512).unwrap_err().to_string();
            assert!(
                err.contains("--sweep") && err.contains("1e5,1e6"),
                "{bad}: {err}"
            );
        }
        let err = parse_capacities("1e5,100", 512).unwrap_err().to_string();
        assert!(err.contains("less than one block"), "{err}");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(50_000_000), "50,000,000");
    }
}
