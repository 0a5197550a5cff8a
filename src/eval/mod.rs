//! Evaluation: Rouge-L identical to `rouge_score`, and validation for checkpoint selection.

pub mod calibration;
pub mod evaluate;
pub mod exposure;
pub mod metrics;
pub mod porter;
pub mod rouge;
pub mod sets;
pub mod validate;

pub use rouge::{rouge_l, rouge_l_max, tokenize, RougeScore};
