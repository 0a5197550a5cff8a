//! Evaluation sets: the paper's five (by name, from `../shared/data/minillm_eval`) or any jsonl
//! with `instruction`/`input`/`output(s)` or a ready `prompt`; outputs may be a string or a
//! list of references.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::data::instruct::record_prompt_output;
use crate::data::jsonl::read_jsonl;

/// The paper's evaluation sets: name → file under the data directory.
pub const BUILTIN: &[(&str, &str)] = &[
    ("dolly", "dolly/valid.jsonl"),
    ("self-inst", "self-inst/valid.jsonl"),
    ("vicuna", "vicuna/valid.jsonl"),
    ("sinst", "sinst/11_/valid.jsonl"),
    ("uinst", "uinst/0_2/valid.jsonl"),
];

/// Default location of the built-in sets.
pub const DEFAULT_DATA_DIR: &str = "../shared/data/minillm_eval";

/// One example: the prompt text and its references.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalExample {
    /// Prompt text (template applied).
    pub prompt: String,
    /// Reference outputs.
    pub references: Vec<String>,
}

/// A loaded set.
#[derive(Clone, Debug)]
pub struct EvalSet {
    /// Name (a built-in name or the file stem).
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    /// Examples in file order.
    pub examples: Vec<EvalExample>,
}

impl EvalSet {
    /// Whether the paper breaks this set down by reference length (S-NI, UnNI).
    pub fn has_length_buckets(&self) -> bool {
        matches!(self.name.as_str(), "sinst" | "uinst")
    }
}

/// Resolves a set name (built-in, relative to `data_dir`) or a path to a jsonl file.
pub fn resolve(name: &str, data_dir: &Path) -> Result<(String, PathBuf)> {
    if let Some((n, rel)) = BUILTIN.iter().find(|(n, _)| *n == name) {
        return Ok((n.to_string(), data_dir.join(rel)));
    }
    let p = PathBuf::from(name);
    if p.extension().is_some_and(|e| e == "jsonl") {
        let stem = p.file_stem().map_or("set".into(), |s| s.to_string_lossy().to_string());
        return Ok((stem, p));
    }
    let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
    bail!("unknown evaluation set `{name}`: use one of {} or a path to a .jsonl file", names.join(", "))
}

/// Loads one set; every line must have a prompt (or instruction) and at least one reference.
pub fn load_set(name: &str, data_dir: &Path) -> Result<EvalSet> {
    let (name, path) = resolve(name, data_dir)?;
    if !path.is_file() {
        bail!("evaluation set `{name}`: {} does not exist", path.display());
    }
    let mut examples = Vec::new();
    for (line, parsed) in read_jsonl(&path)? {
        let v = parsed.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
        let (prompt, references) =
            record_prompt_output(&v).map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
        examples.push(EvalExample { prompt, references });
    }
    if examples.is_empty() {
        bail!("evaluation set `{name}` ({}) is empty", path.display());
    }
    Ok(EvalSet { name, path, examples })
}

/// The paper's reference-length buckets (in tokens of the first reference): \[0,5\], \[6,10\],
/// [11,∞).
pub fn length_bucket(tokens: usize) -> &'static str {
    match tokens {
        0..=5 => "[0,5]",
        6..=10 => "[6,10]",
        _ => "[11,inf)",
    }
}
