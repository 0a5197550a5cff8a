//! Per-token log-probabilities of given sequences under a model (`minillm score`, and the
//! building block of LM-loss evaluation).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use serde_json::{json, Value};

use crate::data::jsonl::read_jsonl;
use crate::model::{log_softmax_last, AttentionMask, CausalLm, Model};
use crate::progress::Progress;
use crate::tokenizer::encode_example;

/// Rows scored per progress update.
const CHUNK: usize = 64;

/// A sequence to score and the first position whose token is scored (≥ 1: the first token has
/// no prefix to be predicted from).
#[derive(Clone, Debug)]
pub struct ScoreRequest {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Tokens at positions `score_from..` are scored.
    pub score_from: usize,
}

/// Log-probabilities of the scored tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenScores {
    /// `log p(ids[j] | ids[..j])` for `j` in `score_from..len`.
    pub logprobs: Vec<f32>,
    /// Sum of `logprobs` (accumulated in f64).
    pub total: f64,
}

/// Scores `requests`, batching rows so that a batch holds at most `max_batch_tokens` padded
/// tokens (at least one row per batch). Results are in request order.
pub fn score(lm: &dyn CausalLm, requests: &[ScoreRequest], max_batch_tokens: usize) -> Result<Vec<TokenScores>> {
    for (i, r) in requests.iter().enumerate() {
        if r.score_from == 0 || r.score_from > r.ids.len() {
            bail!("sequence {i}: cannot score from position {} of a {}-token sequence", r.score_from, r.ids.len());
        }
        if let Some(limit) = lm.info().max_positions {
            if r.ids.len() > limit {
                bail!("sequence {i} has {} tokens; the model supports at most {limit}", r.ids.len());
            }
        }
        if let Some(&bad) = r.ids.iter().find(|&&t| t as usize >= lm.info().vocab_size) {
            bail!("sequence {i} contains token id {bad}, outside the model's vocabulary of {}", lm.info().vocab_size);
        }
    }
    let device = lm.lm_head_weight().device().clone();
    let mut out = Vec::with_capacity(requests.len());
    let mut start = 0;
    while start < requests.len() {
        let mut end = start + 1;
        let mut longest = requests[start].ids.len();
        while end < requests.len() {
            let l = longest.max(requests[end].ids.len());
            if l * (end + 1 - start) > max_batch_tokens {
                break;
            }
            longest = l;
            end += 1;
        }
        let batch = &requests[start..end];
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut rows = Vec::with_capacity(batch.len());
        for r in batch {
            ids.extend(r.ids.iter().copied().chain(std::iter::repeat_n(0, longest - r.ids.len())));
            rows.push([vec![1u8; r.ids.len()], vec![0u8; longest - r.ids.len()]].concat());
        }
        let input = Tensor::from_vec(ids, (batch.len(), longest), &device)?;
        let hidden = lm.forward_hidden(&input, &AttentionMask::from_rows(&rows)?, None)?;
        for (b, r) in batch.iter().enumerate() {
            // Position j−1 predicts token j; only this row's scored span goes through the
            // LM head, so memory is one row's [len × vocab] at a time.
            let n = r.ids.len() - r.score_from;
            if n == 0 {
                out.push(TokenScores { logprobs: vec![], total: 0.0 });
                continue;
            }
            let h = hidden.get(b)?.narrow(0, r.score_from - 1, n)?;
            let lp = log_softmax_last(&lm.logits(&h)?.to_dtype(DType::F32)?)?;
            let targets = Tensor::from_vec(r.ids[r.score_from..].to_vec(), (n, 1), &device)?;
            let logprobs: Vec<f32> = lp.gather(&targets, D::Minus1)?.squeeze(1)?.to_vec1()?;
            let total = logprobs.iter().map(|&x| x as f64).sum();
            out.push(TokenScores { logprobs, total });
        }
        start = end;
    }
    Ok(out)
}

/// Reads `{"text"}` or `{"prompt", "response"}` lines from `input` and writes to `out` one JSON
/// line per input line with the token ids, the log-probability of every scored token given
/// its prefix, and the total. For prompt/response lines the response tokens (with EOS) are
/// scored, tokenised as in training; for text lines every token after the first.
pub fn score_jsonl(model: &Model, input: &Path, out: &mut dyn Write, batch_tokens: usize) -> Result<()> {
    let tok = model.tokenizer()?;
    let mut requests = Vec::new();
    let mut lines = Vec::new();
    for (line, parsed) in read_jsonl(input)? {
        let at = || format!("{}:{line}", input.display());
        let v: Value = parsed.with_context(at)?;
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let req = match (field("text"), field("prompt"), field("response")) {
            (Some(t), _, _) => {
                let ids = tok.encode(t)?;
                if ids.is_empty() {
                    bail!("{}: `text` is empty", at());
                }
                ScoreRequest { score_from: 1, ids }
            }
            (None, Some(p), Some(r)) => {
                let ex = encode_example(tok, p, r, model.eos()?)?;
                if ex.prompt.is_empty() {
                    bail!("{}: `prompt` is empty", at());
                }
                ScoreRequest { score_from: ex.prompt.len(), ids: [ex.prompt, ex.response].concat() }
            }
            _ => bail!("{}: expected a string field `text`, or string fields `prompt` and `response`", at()),
        };
        requests.push(req);
        lines.push(line);
    }
    let progress = Progress::new("scoring", requests.len() as u64);
    for (chunk, line_nos) in requests.chunks(CHUNK).zip(lines.chunks(CHUNK)) {
        let scores = score(model.lm.as_ref(), chunk, batch_tokens).with_context(|| {
            format!("scoring lines {}–{} of {}", line_nos[0], line_nos[line_nos.len() - 1], input.display())
        })?;
        for ((req, s), line) in chunk.iter().zip(scores).zip(line_nos) {
            let row = json!({
                "line": line,
                "ids": req.ids,
                "scored_from": req.score_from,
                "logprobs": s.logprobs,
                "total": s.total,
            });
            writeln!(out, "{row}")?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    out.flush()?;
    Ok(())
}
