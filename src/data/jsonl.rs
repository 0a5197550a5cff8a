//! Reading jsonl files: every non-blank line parsed, with its 1-based line number for error
//! messages. A UTF-8 byte-order mark is skipped; a line that is not valid UTF-8 or not valid
//! JSON is returned as its error, so callers can stop (naming the line) or skip and count.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

/// The parsed non-blank lines of `path` with their line numbers.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Result<Value>)>> {
    if path.is_dir() {
        anyhow::bail!("{} is a directory, not a jsonl file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let parsed = match std::str::from_utf8(raw) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => serde_json::from_str(line).map_err(|e| anyhow!("invalid JSON: {e}")),
            Err(e) => Err(anyhow!("not valid UTF-8 (at byte {} of the line)", e.valid_up_to())),
        };
        out.push((i + 1, parsed));
    }
    Ok(out)
}
