//! `minillm score`: per-token log-probabilities of every line of a jsonl file.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::LoadOptions;
use crate::data::jsonl::read_jsonl;
use crate::score::{score as score_requests, ScoreRequest};
use crate::tokenizer::encode_example;

/// Rows scored per progress update.
const CHUNK: usize = 64;

/// Reads `{"text"}` or `{"prompt", "response"}` lines and writes one JSON line per input line
/// with the token ids, the log-probability of every scored token given its prefix, and the
/// total. For prompt/response lines the response tokens (with EOS) are scored, tokenised as
/// in training; for text lines every token after the first.
pub fn score(load: &LoadOptions, input: &Path, output: Option<&Path>, batch_tokens: usize) -> Result<()> {
    let model = load.load()?;
    let tok = model.tokenizer()?;
    let mut requests = Vec::new();
    let mut lines = Vec::new();
    for (line, parsed) in read_jsonl(input)? {
        let at = || format!("{}:{line}", input.display());
        let v: Value = parsed.with_context(|| format!("{}: invalid JSON", at()))?;
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
    // To a file: collected and written atomically at the end; to stdout: streamed.
    let mut buffer = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let out: &mut dyn Write = if output.is_some() { &mut buffer } else { &mut stdout };
    let bar = indicatif::ProgressBar::new(requests.len() as u64).with_style(indicatif::ProgressStyle::with_template(
        "scoring {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )?);
    for (chunk, line_nos) in requests.chunks(CHUNK).zip(lines.chunks(CHUNK)) {
        let scores = score_requests(model.lm.as_ref(), chunk, batch_tokens).with_context(|| {
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
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    out.flush()?;
    if let Some(p) = output {
        crate::atomic::write_file(p, &buffer)?;
    }
    Ok(())
}
