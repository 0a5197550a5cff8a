//! Reading jsonl files: every non-blank line parsed, with its 1-based line number for error
//! messages.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// The parsed non-blank lines of `path` with their line numbers; a line that is not valid JSON
/// is returned as its error so that callers can stop or skip and count.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Result<Value>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, serde_json::from_str(l)))
        .collect())
}
