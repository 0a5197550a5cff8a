//! A resumable, seeded, epoch-wise shuffled order over a data set.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Position in an epoch-wise shuffled order; the permutation of epoch `e` is derived from
/// `(seed, e)` alone, so the state is just two numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOrder {
    len: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    #[serde(skip)]
    perm: Vec<usize>,
}

impl DataOrder {
    /// An order over `len` items.
    pub fn new(len: usize, seed: u64) -> Self {
        let mut o = Self { len, seed, epoch: 0, pos: 0, perm: Vec::new() };
        o.shuffle();
        o
    }

    fn shuffle(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.epoch);
        self.perm = (0..self.len).collect();
        self.perm.shuffle(&mut rng);
    }

    /// The next `n` indices; an epoch that cannot fill a whole batch is skipped (drop-last).
    pub fn next(&mut self, n: usize) -> Vec<usize> {
        let n = n.min(self.len);
        if self.pos + n > self.len {
            self.epoch += 1;
            self.pos = 0;
            self.shuffle();
        }
        let out = self.perm[self.pos..self.pos + n].to_vec();
        self.pos += n;
        out
    }

    /// Completed epochs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Restores a saved order (the permutation is recomputed).
    pub fn restored(mut self) -> Self {
        self.shuffle();
        self
    }
}
