//! Shared helpers for kvpool's criterion benchmarks (see `benches/`).
