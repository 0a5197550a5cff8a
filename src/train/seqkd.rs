//! SeqKD's first phase: the teacher samples a response (temperature 1) for every training
//! prompt; the student is then trained on those (prompt, response) pairs by
//! [`super::supervised::SupervisedTask`].
//!
//! Generations are appended to `<file>.partial` chunk by chunk as they are made, so an
//! interrupted run resumes where it stopped; the complete set is then renamed into place and
//! reused by later runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::data::instruct::InstructExample;
use crate::generate::{consecutive_rows, Sampler, SamplingConfig};
use crate::model::Model;
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;

/// How the teacher samples.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationSettings {
    /// Most new tokens per response.
    pub max_new_tokens: usize,
    /// Prompt + response limit.
    pub max_len: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Seed of the sampling streams (one per prompt).
    pub seed: u64,
}

/// Writes one teacher sample per example of `prompts` to `path` as jsonl (`prompt`, `output`),
/// decoded with `tok`; the teacher ends a response at the student's `eos` and pads with `pad`.
pub fn teacher_generations(
    teacher: &Model,
    tok: &Tokenizer,
    eos: &[u32],
    pad: u32,
    prompts: &[InstructExample],
    settings: &GenerationSettings,
    path: &Path,
) -> Result<()> {
    let partial = partial_path(path);
    // Whole chunks only, so a resumed run decodes the same chunks as an uninterrupted one.
    let batch = settings.batch_size.max(1);
    let done = completed_rows(&partial, batch)?;
    let todo: Vec<usize> = (done.len()..prompts.len()).collect();
    let progress = Progress::new("teacher generations", prompts.len() as u64);
    progress.set_position(done.len() as u64);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let cfg =
        SamplingConfig { max_length: Some(settings.max_len), ..SamplingConfig::sampling(settings.max_new_tokens) };
    let ids: Vec<Vec<u32>> = todo.iter().map(|&i| prompts[i].prompt.clone()).collect();
    let rows = consecutive_rows(done.len() as u64, todo.len());
    Sampler::plain_lm(teacher.lm.as_ref(), &cfg, eos, pad).decode_in_chunks(
        &ids,
        settings.seed,
        &rows,
        batch,
        |first, samples| {
            let mut lines = String::new();
            for (k, s) in samples.iter().enumerate() {
                let index = todo[first + k];
                let row = json!({"index": index, "prompt": tok.decode(&s.prompt, true)?, "output": tok.decode_response(&s.response, eos)?});
                lines.push_str(&format!("{row}\n"));
            }
            file.write_all(lines.as_bytes()).with_context(|| format!("writing {}", partial.display()))?;
            file.flush()?;
            progress.inc(samples.len() as u64);
            Ok(())
        },
    )?;
    progress.finish();
    drop(file);
    // The finished file holds exactly the training pairs, in prompt order.
    let mut text = String::new();
    for row in completed_rows(&partial, 1)? {
        text.push_str(&format!("{}\n", json!({"prompt": row["prompt"], "output": row["output"]})));
    }
    crate::atomic::write_file(path, text.as_bytes())?;
    std::fs::remove_file(&partial).with_context(|| format!("removing {}", partial.display()))?;
    Ok(())
}

/// Where generations in progress are kept.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// The complete rows of a partial file, in order, cut to a multiple of `chunk` rows (the file
/// is rewritten without what is dropped, e.g. a torn last line).
fn completed_rows(path: &Path, chunk: usize) -> Result<Vec<Value>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let mut rows = Vec::new();
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { break };
        if v.get("index").and_then(Value::as_u64) != Some(rows.len() as u64) {
            break;
        }
        rows.push(v);
    }
    rows.truncate(rows.len() / chunk * chunk);
    for row in &rows {
        kept.push_str(&format!("{row}\n"));
    }
    if kept.len() != text.len() {
        crate::atomic::write_file(path, kept.as_bytes())?;
    }
    Ok(rows)
}
