//! The paper's evaluation protocol: Rouge-L identical to `rouge_score` (its tokenizer and
//! NLTK's Porter stemmer), the five instruction sets, Dist-n and LM loss, and the sets × seeds
//! evaluation with resumable generations.

pub mod evaluate;
pub mod metrics;
pub mod porter;
pub mod rouge;
pub mod sets;

pub use rouge::{rouge_l, rouge_l_max, tokenize, RougeScore};
