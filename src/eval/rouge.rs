//! Rouge-L exactly as Google's `rouge_score` computes it with
//! `RougeScorer(['rougeL'], use_stemmer=True)`: lowercase, every run of characters outside
//! `[a-z0-9]` becomes a space, split on whitespace, Porter-stem tokens longer than 3
//! characters, then the LCS-based F-measure. Several references: the maximum.

use super::porter;

/// Precision, recall and F-measure of one comparison (in [0, 1]).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RougeScore {
    /// LCS / prediction length.
    pub precision: f64,
    /// LCS / reference length.
    pub recall: f64,
    /// Harmonic mean.
    pub fmeasure: f64,
}

/// `rouge_score`'s tokenizer (with its stemmer when `stem` is set).
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    let cleaned: String =
        lower.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' }).collect();
    cleaned
        .split_ascii_whitespace()
        .map(|t| if stem && t.len() > 3 { porter::stem(t) } else { t.to_string() })
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .collect()
}

/// Length of the longest common subsequence (two rows of the DP table).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (a, b) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Rouge-L of tokenised texts.
pub fn rouge_l_tokens(prediction: &[String], reference: &[String]) -> RougeScore {
    if prediction.is_empty() || reference.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_len(reference, prediction) as f64;
    let precision = lcs / prediction.len() as f64;
    let recall = lcs / reference.len() as f64;
    let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    RougeScore { precision, recall, fmeasure }
}

/// Rouge-L (with stemming) of a prediction against one reference.
pub fn rouge_l(prediction: &str, reference: &str) -> RougeScore {
    rouge_l_tokens(&tokenize(prediction, true), &tokenize(reference, true))
}

/// The best Rouge-L F-measure over several references (0 when there are none).
pub fn rouge_l_max(prediction: &str, references: &[&str]) -> f64 {
    let p = tokenize(prediction, true);
    references.iter().map(|r| rouge_l_tokens(&p, &tokenize(r, true)).fmeasure).fold(0.0, f64::max)
}
