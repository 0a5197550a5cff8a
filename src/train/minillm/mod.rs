//! MiniLLM (`minillm distill`): its settings, the rollout buffer, and the task the shared
//! trainer runs.

pub mod config;
pub mod rollout;
pub mod task;

pub use config::DistillConfig;
pub use task::{DistillData, DistillTask};
