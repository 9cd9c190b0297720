//! Per-key bookkeeping of one batch call, shared by the backends.
//!
//! A batch is answered in input order but worked out of order: keys are
//! checked, repeats set aside, the rest grouped by server, pipeline or write,
//! and answers arrive as that work finishes. [`Outcomes`] collects them by
//! index, [`Repeats`] sends a key given twice in one batch once, and
//! [`check_value_len`] refuses values the contract forbids, all with one
//! wording across backends.
//!
//! A slot no answer reached is a bug in the backend, never a panic: it
//! becomes that key's [`ErrorKind::Unexpected`] failure (see
//! [`Outcomes::into_vec`]), so the caller still gets one outcome per key and
//! the other keys of the batch are unaffected.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::Hash;

use crate::backend::{GetOutcome, PutOutcome};
use crate::error::{Error, ErrorKind, Result};
use crate::key::BlockKey;

/// A per-key result that can carry a failure; [`Outcomes::into_vec`] fills
/// the slots no answer reached with one.
pub trait BatchOutcome {
    /// The outcome of a key that failed with `error`.
    fn failed(error: Error) -> Self;
}

impl BatchOutcome for PutOutcome {
    fn failed(error: Error) -> Self {
        PutOutcome::Failed(error)
    }
}

impl BatchOutcome for GetOutcome {
    fn failed(error: Error) -> Self {
        GetOutcome::Failed(error)
    }
}

/// One slot per key of a batch, filled by index in any order, then handed
/// back in input order.
#[derive(Debug)]
pub struct Outcomes<T> {
    slots: Vec<Option<T>>,
    op: &'static str,
}

impl<T> Outcomes<T> {
    /// `len` empty slots for a call of operation `op` (`"put"`, `"get_into"`),
    /// which names the failure of a slot left empty.
    pub fn new(len: usize, op: &'static str) -> Self {
        Outcomes {
            slots: std::iter::repeat_with(|| None).take(len).collect(),
            op,
        }
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the batch has no key.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sets the outcome of key `index`, replacing any earlier one.
    ///
    /// # Panics
    /// If `index` is not below [`len`](Self::len), as indexing a slice would.
    pub fn set(&mut self, index: usize, outcome: T) {
        self.slots[index] = Some(outcome);
    }

    /// The outcome of key `index`, if it has one yet.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.slots.get(index).and_then(Option::as_ref)
    }

    /// Whether key `index` has an outcome yet.
    pub fn is_set(&self, index: usize) -> bool {
        self.get(index).is_some()
    }

    /// The outcomes in input order; a slot left empty gets `missing(index)`,
    /// for callers to whom an empty slot means something (a key no tier had).
    pub fn into_vec_with(self, mut missing: impl FnMut(usize) -> T) -> Vec<T> {
        self.slots
            .into_iter()
            .enumerate()
            .map(|(i, o)| o.unwrap_or_else(|| missing(i)))
            .collect()
    }
}

impl<T: BatchOutcome> Outcomes<T> {
    /// The outcomes in input order. A slot left empty, which only a bug in
    /// the backend leaves, is that key's failure: [`no_outcome`].
    pub fn into_vec(self) -> Vec<T> {
        let op = self.op;
        self.into_vec_with(|i| T::failed(no_outcome(op, i)))
    }
}

/// The failure of key `index` of a batch that got no outcome: a bug, so
/// [`ErrorKind::Unexpected`] and permanent.
pub fn no_outcome(op: &'static str, index: usize) -> Error {
    Error::new(ErrorKind::Unexpected, "a key of the batch got no outcome")
        .with_operation(op)
        .with_context("index", index)
}

/// Keys given more than once in one batch.
///
/// The first occurrence of a key is the one a backend works on; sent
/// together, the copies would race and either could win. Each later
/// occurrence, a *repeat*, is remembered with the index of its first and
/// answered by [`settle`](Self::settle) once the first has its outcome.
/// Backends pass only valid items, so an invalid first copy does not hide a
/// valid repeat.
#[derive(Debug)]
pub struct Repeats<K> {
    first: HashMap<K, usize, foldhash::fast::RandomState>,
    repeats: Vec<(usize, usize)>,
}

impl<K: Hash + Eq> Repeats<K> {
    /// Room for a batch of `len` keys.
    pub fn with_capacity(len: usize) -> Self {
        Repeats {
            first: HashMap::with_capacity_and_hasher(len, Default::default()),
            repeats: Vec::new(),
        }
    }

    /// Records `key` at `index`: `true` for its first occurrence in the
    /// batch, `false` for a repeat.
    pub fn first(&mut self, index: usize, key: K) -> bool {
        match self.first.entry(key) {
            Entry::Occupied(e) => {
                self.repeats.push((index, *e.get()));
                false
            }
            Entry::Vacant(e) => {
                e.insert(index);
                true
            }
        }
    }

    /// The repeats so far, each as `(index, index of the first occurrence)`.
    pub fn repeats(&self) -> &[(usize, usize)] {
        &self.repeats
    }

    /// Answers every repeat from its first occurrence, exactly as a later
    /// call would be answered: `Exists` when the first is stored or present,
    /// and when it failed, that failure restated by `restate` (see
    /// [`repeat_failure`]). A first with no outcome, a bug, makes its
    /// repeats fail the same way.
    pub fn settle(self, outcomes: &mut Outcomes<PutOutcome>, restate: impl Fn(&Error) -> Error) {
        for (index, first) in self.repeats {
            let outcome = match outcomes.get(first) {
                Some(PutOutcome::Failed(e)) => PutOutcome::Failed(restate(e)),
                Some(_) => PutOutcome::Exists,
                None => PutOutcome::Failed(restate(&no_outcome(outcomes.op, first))),
            };
            outcomes.set(index, outcome);
        }
    }
}

/// The failure of a repeat whose first occurrence failed with `e`: the same
/// kind, its message quoted.
pub fn repeat_failure(e: &Error) -> Error {
    Error::new(
        e.kind(),
        format!("the same key earlier in the batch failed: {}", e.message()),
    )
    .with_operation("put")
}

/// Checks the length of a value to put: at least one byte, and at most
/// `max`, with `over(len)` as the message for a value past the backend's
/// limit. The error is that key's `InvalidArgument` failure.
pub fn check_value_len(
    key: &BlockKey,
    len: usize,
    max: usize,
    over: impl FnOnce(usize) -> String,
) -> Result<()> {
    let why = if len == 0 {
        "a value must be at least 1 byte".to_string()
    } else if len > max {
        over(len)
    } else {
        return Ok(());
    };
    Err(Error::invalid_argument(why)
        .with_operation("put")
        .with_context("key", key))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::key::{BlockHash, Namespace};

    fn key(i: u8) -> BlockKey {
        let ns = Arc::new(Namespace::single_rank("m").unwrap());
        BlockKey::new(ns, BlockHash([i; 32]))
    }

    fn describe(o: &PutOutcome) -> String {
        match o {
            PutOutcome::Stored => "stored".into(),
            PutOutcome::Exists => "exists".into(),
            PutOutcome::Failed(e) => format!("failed: {e}"),
        }
    }

    #[test]
    fn outcomes_filled_out_of_order_come_back_in_input_order() {
        let mut out = Outcomes::new(3, "put");
        assert_eq!((out.len(), out.is_empty()), (3, false));
        out.set(2, PutOutcome::Exists);
        out.set(0, PutOutcome::Stored);
        assert!(out.is_set(0) && !out.is_set(1) && out.is_set(2));
        assert!(!out.is_set(3), "past the end is just unset");
        out.set(1, PutOutcome::Exists);
        out.set(1, PutOutcome::Stored);
        let got: Vec<_> = out.into_vec().iter().map(describe).collect();
        assert_eq!(got, ["stored", "stored", "exists"]);
    }

    #[test]
    fn an_empty_slot_is_an_unexpected_failure_of_that_key_only() {
        let mut out = Outcomes::new(3, "get_into");
        out.set(0, GetOutcome::Hit);
        out.set(2, GetOutcome::Miss);
        let got = out.into_vec();
        assert!(matches!(got[0], GetOutcome::Hit));
        assert!(matches!(got[2], GetOutcome::Miss));
        let GetOutcome::Failed(e) = &got[1] else {
            panic!("expected a failure, got {:?}", got[1]);
        };
        assert_eq!(e.kind(), ErrorKind::Unexpected);
        assert!(!e.is_temporary());
        assert_eq!(e.operation(), "get_into");
        assert_eq!(
            e.to_string(),
            "unexpected (permanent) at get_into: a key of the batch got no outcome [index=1]"
        );
    }

    #[test]
    fn into_vec_with_fills_empty_slots_from_the_caller() {
        let mut out: Outcomes<u32> = Outcomes::new(4, "exists");
        out.set(1, 10);
        out.set(3, 30);
        assert_eq!(out.into_vec_with(|i| i as u32 + 100), [100, 10, 102, 30]);
        assert!(Outcomes::<u32>::new(0, "exists").is_empty());
    }

    #[test]
    fn repeats_remember_the_first_occurrence() {
        let (a, b) = (key(1), key(2));
        let mut r = Repeats::with_capacity(5);
        assert!(r.first(0, &a));
        assert!(r.first(1, &b));
        assert!(!r.first(2, &a));
        assert!(!r.first(4, &a));
        assert!(!r.first(3, &b));
        assert_eq!(r.repeats(), &[(2, 0), (4, 0), (3, 1)]);
    }

    #[test]
    fn a_repeat_shares_the_fate_of_its_first() {
        let keys = [key(1), key(2), key(3), key(1), key(2), key(3)];
        let mut out = Outcomes::new(keys.len(), "put");
        let mut r = Repeats::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            // Index 2 is invalid: it is answered at once and is no first.
            if i == 2 {
                out.set(i, PutOutcome::Failed(Error::invalid_argument("empty")));
                continue;
            }
            r.first(i, k);
        }
        out.set(0, PutOutcome::Stored);
        out.set(
            1,
            PutOutcome::Failed(Error::new(ErrorKind::Timeout, "slow").with_operation("put")),
        );
        out.set(5, PutOutcome::Stored);
        r.settle(&mut out, repeat_failure);
        let got: Vec<_> = out.into_vec().iter().map(describe).collect();
        assert_eq!(
            got,
            [
                "stored",
                "failed: timeout (temporary) at put: slow",
                "failed: invalid_argument (permanent): empty",
                "exists",
                "failed: timeout (temporary) at put: the same key earlier in the batch \
                 failed: slow",
                "stored",
            ]
        );
    }

    #[test]
    fn settle_takes_the_backends_wording() {
        let mut out = Outcomes::new(2, "put");
        let mut r = Repeats::with_capacity(2);
        r.first(0, "k".to_string());
        r.first(1, "k".to_string());
        out.set(
            0,
            PutOutcome::Failed(Error::new(ErrorKind::NoSpace, "full")),
        );
        r.settle(&mut out, |e| {
            Error::new(e.kind(), format!("same key earlier: {}", e.message()))
        });
        let got: Vec<_> = out.into_vec().iter().map(describe).collect();
        assert_eq!(
            got[1],
            "failed: no_space (temporary): same key earlier: full"
        );
    }

    #[test]
    fn a_repeat_of_a_first_with_no_outcome_fails_too() {
        let mut out = Outcomes::new(2, "put");
        let mut r = Repeats::with_capacity(2);
        r.first(0, 7u32);
        r.first(1, 7u32);
        r.settle(&mut out, repeat_failure);
        let got: Vec<_> = out.into_vec().iter().map(describe).collect();
        assert_eq!(
            got,
            [
                "failed: unexpected (permanent) at put: a key of the batch got no outcome \
                 [index=0]",
                "failed: unexpected (permanent) at put: the same key earlier in the batch \
                 failed: a key of the batch got no outcome",
            ]
        );
    }

    #[test]
    fn value_lengths_are_checked_against_the_contract() {
        let k = key(9);
        assert!(check_value_len(&k, 1, 10, |_| unreachable!()).is_ok());
        assert!(check_value_len(&k, 10, 10, |_| unreachable!()).is_ok());
        let empty = check_value_len(&k, 0, 10, |_| unreachable!()).unwrap_err();
        assert_eq!(empty.kind(), ErrorKind::InvalidArgument);
        assert_eq!(empty.operation(), "put");
        assert_eq!(empty.message(), "a value must be at least 1 byte");
        assert_eq!(empty.context(), &[("key", k.to_string())]);
        let over =
            check_value_len(&k, 11, 10, |len| format!("{len} bytes is over 10")).unwrap_err();
        assert_eq!(over.kind(), ErrorKind::InvalidArgument);
        assert_eq!(over.message(), "11 bytes is over 10");
        assert_eq!(over.context(), &[("key", k.to_string())]);
    }
}
