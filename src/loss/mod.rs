//! Losses: token-level divergences (KD, the single-step term, the PT term) and the policy
//! gradient pieces of MiniLLM.

pub mod divergence;

pub use divergence::{divergence, divergence_reference, Divergence};
