//! Instruction data sets (jsonl with `instruction`, `input`, `output`, or a ready `prompt`):
//! template, tokenisation and the length limits of the released implementation (prompts over
//! 256 tokens dropped, prompt + response truncated to 512).

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use super::jsonl::read_jsonl;
use crate::tokenizer::{encode_example, format_prompt, Tokenizer};

/// One tokenised example.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstructExample {
    /// Prompt token ids (template applied).
    pub prompt: Vec<u32>,
    /// Response token ids with EOS (truncated to the length limit).
    pub response: Vec<u32>,
    /// 1-based line in the source file.
    pub line: usize,
    /// The reference output text(s) (Rouge-L takes the best match).
    pub references: Vec<String>,
}

/// Limits and error policy.
#[derive(Clone, Debug)]
pub struct InstructOptions {
    /// Prompts longer than this are dropped.
    pub max_prompt_len: usize,
    /// Prompt + response are truncated to this.
    pub max_len: usize,
    /// Skip malformed lines (counted) instead of stopping at the first.
    pub skip_malformed: bool,
}

impl Default for InstructOptions {
    fn default() -> Self {
        Self { max_prompt_len: 256, max_len: 512, skip_malformed: false }
    }
}

/// What loading kept and dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Lines skipped as malformed (only with `skip_malformed`).
    pub malformed: usize,
    /// Examples dropped because the prompt is over the limit.
    pub long_prompts: usize,
    /// Examples whose response was truncated.
    pub truncated: usize,
}

/// The reference texts in field `key` of a record: a string or a non-empty list of strings.
pub fn references(v: &Value, key: &str) -> Result<Vec<String>> {
    match v.get(key) {
        Some(Value::String(o)) => Ok(vec![o.clone()]),
        Some(Value::Array(a)) => {
            let list: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(str::to_string)).collect();
            match list {
                Some(l) if !l.is_empty() => Ok(l),
                _ => bail!("`{key}` is an empty list or not a list of strings"),
            }
        }
        _ => bail!("expected a string field `{key}`"),
    }
}

/// The prompt text and reference outputs of one jsonl record (`output` may be a string or a
/// list of strings; training uses the first).
pub fn record_prompt_output(v: &Value) -> Result<(String, Vec<String>)> {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let prompt = match (s("instruction"), s("prompt")) {
        (Some(i), _) => format_prompt(i, s("input").unwrap_or("")),
        (None, Some(p)) => p.to_string(),
        _ => bail!("expected a string field `instruction` (or `prompt`)"),
    };
    let outputs = references(v, "output")?;
    Ok((prompt, outputs))
}

/// Loads and tokenises an instruction jsonl file.
pub fn load_instruct(
    path: &Path,
    tok: &Tokenizer,
    eos: u32,
    opts: &InstructOptions,
) -> Result<(Vec<InstructExample>, LoadReport)> {
    let mut out = Vec::new();
    let mut report = LoadReport::default();
    for (line, parsed) in read_jsonl(path)? {
        let parsed = parsed.and_then(|v| record_prompt_output(&v));
        let (prompt, references) = match parsed {
            Ok(x) => x,
            Err(e) if opts.skip_malformed => {
                tracing::debug!("{}:{line}: skipped: {e}", path.display());
                report.malformed += 1;
                continue;
            }
            Err(e) => bail!("{}:{line}: {e}", path.display()),
        };
        let mut ex = encode_example(tok, &prompt, &references[0], eos)?;
        if ex.prompt.len() > opts.max_prompt_len {
            report.long_prompts += 1;
            continue;
        }
        let room = opts.max_len.saturating_sub(ex.prompt.len());
        if ex.response.len() > room {
            ex.response.truncate(room);
            report.truncated += 1;
        }
        if ex.response.is_empty() {
            report.long_prompts += 1;
            continue;
        }
        out.push(InstructExample { prompt: ex.prompt, response: ex.response, line, references });
    }
    if out.is_empty() {
        bail!(
            "{}: no usable examples ({} malformed lines skipped, {} prompts over {} tokens)",
            path.display(),
            report.malformed,
            report.long_prompts,
            opts.max_prompt_len
        );
    }
    if report.malformed + report.long_prompts + report.truncated > 0 {
        tracing::info!(
            "{}: {} examples; skipped {} malformed, dropped {} long prompts, truncated {}",
            path.display(),
            out.len(),
            report.malformed,
            report.long_prompts,
            report.truncated
        );
    }
    Ok((out, report))
}
