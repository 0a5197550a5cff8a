//! The plain-text corpus of the pre-training term: one document per line (OpenWebText as
//! MiniLLM ships it, with `<@x(x!>` standing for newlines) or a directory of `.txt` files (one
//! document each), tokenised, joined with EOS and cut into fixed-length chunks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::tokenizer::Tokenizer;

/// MiniLLM's stand-in for newlines inside one-line documents.
const NEWLINE_MARK: &str = "<@x(x!>";

/// Reads a corpus and returns consecutive `chunk_len`-token chunks (the incomplete tail is
/// dropped; a corpus shorter than one chunk is an error).
pub fn load_corpus(path: &Path, tok: &Tokenizer, eos: u32, chunk_len: usize) -> Result<Vec<Vec<u32>>> {
    let docs = read_documents(path)?;
    let mut stream = Vec::new();
    for d in &docs {
        stream.extend(tok.encode(&d.replace(NEWLINE_MARK, "\n"))?);
        stream.push(eos);
    }
    if stream.len() < chunk_len {
        bail!("{}: the corpus has {} tokens, fewer than one {chunk_len}-token chunk", path.display(), stream.len());
    }
    Ok(stream.chunks_exact(chunk_len).map(<[u32]>::to_vec).collect())
}

fn read_documents(path: &Path) -> Result<Vec<String>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} contains no .txt files", path.display());
        }
        return files
            .iter()
            .map(|f| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())))
            .collect();
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading corpus {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
}
