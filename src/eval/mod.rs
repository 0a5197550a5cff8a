//! Evaluation: Rouge-L identical to `rouge_score`.

pub mod porter;
pub mod rouge;

pub use rouge::{rouge_l, rouge_l_max, tokenize, RougeScore};
