//! Output directories a command owns. A directory a command writes into carries a marker,
//! `minillm.json`, naming the kind of output (`sft`, `eval`, `demo`, …) and the identity of
//! what it holds (the settings and input fingerprints its contents depend on). A command
//!
//! - creates a missing or empty directory and marks it;
//! - continues in a directory of its own kind whose identity matches (resume), noting the
//!   settings that may change between invocations (e.g. `train.max_steps`);
//! - refuses anything else — a directory holding files minillm did not write, a directory of
//!   another kind, or one made from other inputs — naming the difference, unless told to
//!   overwrite; and even then it removes only the entries it writes itself.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The marker's file name.
pub const MARKER: &str = "minillm.json";

/// An output directory and what a command of its kind writes into it.
pub struct OutDir<'a> {
    /// The directory.
    pub path: &'a Path,
    /// The kind of output (the command's name).
    pub kind: &'a str,
    /// Removes what this kind of command writes into the directory, and nothing else; the
    /// flag says whether the directory was marked as minillm's (so its subdirectories of
    /// outputs are wholly minillm's too).
    pub reset: &'a dyn Fn(&Path, bool) -> Result<()>,
    /// Whether the directory holds results worth protecting (a minillm directory where nothing
    /// was computed yet is simply reset when its kind or identity changes).
    pub has_results: &'a dyn Fn(&Path) -> bool,
    /// How the command is told to overwrite (`--overwrite`), or `None` when it cannot be.
    pub overwrite_flag: Option<&'a str>,
}

/// How a directory was claimed.
#[derive(Clone, Debug, PartialEq)]
pub enum Claimed {
    /// New, emptied of an earlier run's outputs, or overwritten: start from scratch.
    Fresh,
    /// A directory of this kind with the same identity: continue (resume).
    Continue,
}

impl OutDir<'_> {
    /// Claims the directory for output with `identity` (a JSON object of settings and
    /// fingerprints). Keys in `may_change` may differ from the recorded identity (each change
    /// is reported as a note); any other difference is refused unless `overwrite`, which
    /// resets the directory. A directory holding anything without a marker of this kind is
    /// refused unless `overwrite`.
    pub fn claim(&self, identity: &Value, may_change: &[&str], overwrite: bool) -> Result<Claimed> {
        let dir = self.path;
        let marker = dir.join(MARKER);
        let recorded: Option<Value> = match std::fs::read_to_string(&marker) {
            Ok(text) => {
                Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", marker.display()))?)
            }
            Err(_) => None,
        };
        let empty = std::fs::read_dir(dir).map_or(true, |mut e| e.next().is_none());
        if dir.exists() && !dir.is_dir() {
            bail!("{} is a file, not a directory", dir.display());
        }
        let claimed = match recorded {
            None if empty => Claimed::Fresh,
            None => {
                if !overwrite {
                    bail!(
                        "{} already holds files that minillm did not write; choose another output directory{}",
                        dir.display(),
                        self.or_overwrite("write into it (only the files it writes are replaced)")
                    );
                }
                (self.reset)(dir, false)?;
                Claimed::Fresh
            }
            Some(m) if m.get("kind").and_then(Value::as_str) != Some(self.kind) => {
                let other = m.get("kind").and_then(Value::as_str).unwrap_or("unknown").to_string();
                if !overwrite && (self.has_results)(dir) {
                    bail!(
                        "{} holds a minillm `{other}` output, not `{}`; choose another output directory{}",
                        dir.display(),
                        self.kind,
                        self.or_overwrite("start afresh there (only the files it writes are replaced)")
                    );
                }
                (self.reset)(dir, true)?;
                Claimed::Fresh
            }
            Some(m) => {
                let before = m.get("identity").cloned().unwrap_or(Value::Null);
                let changes = differences(&before, identity);
                let (allowed, refused): (Vec<_>, Vec<_>) =
                    changes.into_iter().partition(|(k, _, _)| may_change.iter().any(|p| k == p));
                if refused.is_empty() {
                    for (k, a, b) in &allowed {
                        crate::progress::note(&format!("{}: {k} changed from {a} to {b}", dir.display()));
                    }
                    Claimed::Continue
                } else if !overwrite && (self.has_results)(dir) {
                    let list: Vec<String> = refused.iter().map(|(k, a, b)| format!("  {k}: {a} → {b}")).collect();
                    bail!(
                        "{} holds a `{}` output made with other settings or inputs:\n{}\nchoose another output \
                         directory or restore those settings{}",
                        dir.display(),
                        self.kind,
                        list.join("\n"),
                        self.or_overwrite("start afresh (only the files it writes are removed)")
                    );
                } else {
                    (self.reset)(dir, true)?;
                    Claimed::Fresh
                }
            }
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let doc = json!({"kind": self.kind, "identity": identity});
        crate::atomic::write_file(&marker, format!("{}\n", serde_json::to_string_pretty(&doc)?).as_bytes())?;
        Ok(claimed)
    }
}

impl OutDir<'_> {
    /// `", or pass --overwrite to <what>"`, when the command can be told to.
    fn or_overwrite(&self, what: &str) -> String {
        self.overwrite_flag.map_or(String::new(), |flag| format!(", or pass {flag} to {what}"))
    }
}

/// The leaves that differ between two JSON values, as (dotted key, before, after).
pub fn differences(before: &Value, after: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    diff_into("", before, after, &mut out);
    out
}

fn diff_into(prefix: &str, a: &Value, b: &Value, out: &mut Vec<(String, String, String)>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                diff_into(&key, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => out.push((prefix.to_string(), show(a), show(b))),
        _ => {}
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "(unset)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Removes the named files and directories of `dir` that exist (an output's own entries).
pub fn remove_entries(dir: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let p = dir.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}
