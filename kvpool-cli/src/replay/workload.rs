//! Generated traces, so an eviction policy is judged on more than one
//! recorded workload.
//!
//! Each generator writes requests in Mooncake's trace format (`timestamp` in
//! milliseconds, `input_length`, `hash_ids` of 512-token blocks), sorted by
//! arrival, from a seed: the same seed gives the same trace on every
//! machine. Block ids form a prefix tree, as real block hashes do: a block
//! id always follows the same parent.
//!
//! - [`Workload::Chat`]: multi-turn chats. Sessions arrive as a Poisson
//!   process, each opens with one of a few system prompts (Pareto-popular),
//!   and every turn resends the whole history plus the last answer and a new
//!   question; turns per session are geometric (mean 3.5), think times
//!   log-normal (median 60 s).
//! - [`Workload::SystemPrompts`]: single-turn requests that share one of 200
//!   system prompts (heavy-tailed popularity, 2–24 blocks) followed by a
//!   unique question: the reusable part is a small set of hot prefixes
//!   drowning in one-off suffixes.
//! - [`Workload::Agents`]: agent loops. Each agent starts from one of a few
//!   long tool-description prefixes and runs 3–40 steps a few seconds apart,
//!   each appending a tool result; now and then it backtracks to a
//!   checkpoint and forks.

use std::fmt;
use std::str::FromStr;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::TraceRequest;
use kvpool::error::{Error, Result};

/// Tokens per block of generated traces (Mooncake's block size).
pub const BLOCK_TOKENS: u64 = 512;

/// A kind of generated workload; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Multi-turn chats with a few shared system prompts.
    Chat,
    /// Single-turn requests behind many shared system prompts.
    SystemPrompts,
    /// Agent loops with long shared tool prefixes, backtracking and forks.
    Agents,
}

impl Workload {
    /// Every kind, in the order reports list them.
    pub const ALL: [Workload; 3] = [Workload::Chat, Workload::SystemPrompts, Workload::Agents];

    /// The name `--generate` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Chat => "chat",
            Workload::SystemPrompts => "system-prompts",
            Workload::Agents => "agents",
        }
    }

    /// Generates the trace. `scale` multiplies the number of sessions (or
    /// requests, or agents): 1.0 gives 9–33 thousand requests.
    pub fn generate(self, seed: u64, scale: f64) -> Result<Vec<TraceRequest>> {
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::invalid_argument(format!(
                "--scale must be a positive number, got {scale}"
            )));
        }
        let count = |base: f64| ((base * scale).round() as usize).max(1);
        let mut g = Gen {
            rng: SmallRng::seed_from_u64(seed),
            next_id: 0,
            events: Vec::new(),
        };
        match self {
            Workload::Chat => g.chat(count(3000.0)),
            Workload::SystemPrompts => g.system_prompts(count(30_000.0)),
            Workload::Agents => g.agents(count(1500.0)),
        }
        Ok(g.finish())
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "unknown workload {s:?}; known workloads: {}",
                    Workload::ALL.map(Workload::name).join(", ")
                ))
            })
    }
}

struct Gen {
    rng: SmallRng,
    next_id: u64,
    /// (arrival in seconds, chain)
    events: Vec<(f64, Vec<u64>)>,
}

impl Gen {
    fn blocks(&mut self, n: usize) -> impl Iterator<Item = u64> {
        let first = self.next_id;
        self.next_id += n as u64;
        first..self.next_id
    }

    fn extend(&mut self, chain: &mut Vec<u64>, n: usize) {
        let new = self.blocks(n);
        chain.extend(new);
    }

    fn exp(&mut self, mean: f64) -> f64 {
        // 1 - U lies in (0, 1], so the logarithm is finite.
        -mean * (1.0 - self.rng.gen::<f64>()).ln()
    }

    fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        // Box–Muller.
        let u1 = 1.0 - self.rng.gen::<f64>();
        let u2 = self.rng.gen::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        median * (sigma * z).exp()
    }

    /// Index into `n` items with Pareto(`alpha`)-distributed popularity:
    /// item 0 is the most popular, and the tail is heavy for small `alpha`.
    fn popular(&mut self, alpha: f64, n: usize) -> usize {
        let u = 1.0 - self.rng.gen::<f64>();
        let x = u.powf(-1.0 / alpha);
        ((x as usize).saturating_sub(1)).min(n - 1)
    }

    fn prefixes(&mut self, n: usize, min: usize, max: usize) -> Vec<Vec<u64>> {
        (0..n)
            .map(|_| {
                let len = self.rng.gen_range(min..=max);
                self.blocks(len).collect()
            })
            .collect()
    }

    fn chat(&mut self, sessions: usize) {
        let prompts = self.prefixes(4, 2, 8);
        let mut start = 0.0;
        for _ in 0..sessions {
            start += self.exp(1.0);
            let mut chain = prompts[self.popular(1.2, prompts.len())].clone();
            let turns = 1 + self.exp(2.5) as usize;
            let mut at = start;
            for _ in 0..turns {
                let question = self.rng.gen_range(1..=6);
                self.extend(&mut chain, question);
                self.events.push((at, chain.clone()));
                at += self.log_normal(60.0, 1.0);
                let answer = self.rng.gen_range(0..=2);
                self.extend(&mut chain, answer);
            }
        }
    }

    fn system_prompts(&mut self, requests: usize) {
        let prompts = self.prefixes(200, 2, 24);
        let mut at = 0.0;
        for _ in 0..requests {
            at += self.exp(0.1);
            let mut chain = prompts[self.popular(0.8, prompts.len())].clone();
            let question = self.rng.gen_range(1..=12);
            self.extend(&mut chain, question);
            self.events.push((at, chain));
        }
    }

    fn agents(&mut self, agents: usize) {
        let tools = self.prefixes(8, 8, 24);
        let mut start = 0.0;
        for _ in 0..agents {
            start += self.exp(2.0);
            let mut chain = tools[self.rng.gen_range(0..tools.len())].clone();
            let task = self.rng.gen_range(1..=4);
            self.extend(&mut chain, task);
            let steps = self.rng.gen_range(3..=40);
            let mut checkpoints: Vec<Vec<u64>> = Vec::new();
            let mut at = start;
            for _ in 0..steps {
                if !checkpoints.is_empty() && self.rng.gen_bool(0.1) {
                    chain = checkpoints[self.rng.gen_range(0..checkpoints.len())].clone();
                }
                let result = self.rng.gen_range(1..=3);
                self.extend(&mut chain, result);
                self.events.push((at, chain.clone()));
                if self.rng.gen_bool(0.2) {
                    checkpoints.push(chain.clone());
                }
                at += self.exp(5.0);
            }
        }
    }

    fn finish(mut self) -> Vec<TraceRequest> {
        // Stable: requests of one instant keep their generation order.
        self.events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut rng = self.rng;
        self.events
            .into_iter()
            .map(|(at, hash_ids)| TraceRequest {
                timestamp: Some((at * 1000.0) as u64),
                // The last block is partly filled, as in real prompts.
                input_length: hash_ids.len() as u64 * BLOCK_TOKENS - rng.gen_range(0..BLOCK_TOKENS),
                hash_ids,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn generation_is_reproducible_and_sorted() {
        for w in Workload::ALL {
            let a = w.generate(7, 0.05).unwrap();
            assert_eq!(a, w.generate(7, 0.05).unwrap(), "{w}");
            assert_ne!(a, w.generate(8, 0.05).unwrap(), "{w}");
            assert!(!a.is_empty());
            assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
            for r in &a {
                let blocks = r.hash_ids.len() as u64;
                assert!(r.input_length > (blocks - 1) * BLOCK_TOKENS);
                assert!(r.input_length <= blocks * BLOCK_TOKENS);
            }
        }
    }

    #[test]
    fn block_ids_form_a_prefix_tree() {
        for w in Workload::ALL {
            let mut parent = HashMap::new();
            for r in w.generate(1, 0.05).unwrap() {
                let mut prev = None;
                for &b in &r.hash_ids {
                    assert_eq!(*parent.entry(b).or_insert(prev), prev, "{w}: block {b}");
                    prev = Some(b);
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_listed() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        let err = "chats".parse::<Workload>().unwrap_err().to_string();
        assert!(err.contains("chat, system-prompts, agents"), "{err}");
        assert!(Workload::Chat.generate(1, 0.0).is_err());
    }
}
