//! Data: instruction sets, the pre-training corpus, batching, and the demo's synthetic task.

pub mod batch;
pub mod instruct;
pub mod jsonl;
pub mod pretrain;
pub mod synthetic;
