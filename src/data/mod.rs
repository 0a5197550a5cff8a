//! Data: instruction sets, the pre-training corpus, and batching.

pub mod batch;
pub mod instruct;
pub mod jsonl;
pub mod pretrain;
