//! Losses: token-level divergences (KD, the single-step term, the PT term) and the policy
//! gradient pieces of MiniLLM.

pub mod cross_entropy;
pub mod divergence;
pub mod head;
pub mod policy;

pub use cross_entropy::{cross_entropy, cross_entropy_reference};
pub use divergence::{divergence, divergence_reference, Divergence};
pub use head::{head_loss, head_loss_reference, HeadLoss, PolicyTokens, TargetTerm, TeacherHead};
