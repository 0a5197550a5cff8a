//! Content fingerprints (xxh3, 64-bit) of the inputs a result depends on, so that resumable
//! work (a training run, an evaluation's generations) is only resumed with the same inputs.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use xxhash_rust::xxh3::Xxh3;

/// The fingerprint of a file's bytes, as 16 hex digits.
pub fn file(path: &Path) -> Result<String> {
    let mut h = Xxh3::new();
    feed(&mut h, path)?;
    Ok(format!("{:016x}", h.digest()))
}

/// The fingerprint of a file, or of a directory's files (in name order, recursively).
pub fn path(p: &Path) -> Result<String> {
    let mut h = Xxh3::new();
    feed_tree(&mut h, p)?;
    Ok(format!("{:016x}", h.digest()))
}

fn feed_tree(h: &mut Xxh3, p: &Path) -> Result<()> {
    if !p.is_dir() {
        return feed(h, p);
    }
    let mut entries: Vec<_> = std::fs::read_dir(p)
        .with_context(|| format!("listing {}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        h.update(e.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        feed_tree(h, &e)?;
    }
    Ok(())
}

/// The fingerprint of a model directory: its `config.json` and weight files.
pub fn model_dir(dir: &Path) -> Result<String> {
    let mut h = Xxh3::new();
    feed(&mut h, &dir.join("config.json"))?;
    for f in crate::model::checkpoint::weight_files(dir)? {
        feed(&mut h, &f)?;
    }
    Ok(format!("{:016x}", h.digest()))
}

fn feed(h: &mut Xxh3, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The fingerprint of a loaded model: its `config.json` and every parameter's name, dtype,
/// shape and values (so the same weights loaded in another precision differ).
pub fn model(m: &crate::model::Model) -> Result<String> {
    let mut h = Xxh3::new();
    h.update(m.config.to_string().as_bytes());
    for (name, t) in m.lm.params().iter() {
        h.update(format!("{name}:{:?}:{:?};", t.dtype(), t.dims()).as_bytes());
        let values: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        for v in values {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(format!("{:016x}", h.digest()))
}
