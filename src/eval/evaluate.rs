//! `minillm eval`: the paper's protocol over sets × seeds (REFERENCE.md §8), and scoring of
//! predictions made elsewhere.
//!
//! Generations are appended to `eval/<set>/seed-<seed>.jsonl` as they are produced, one JSON
//! line per example with its score, so an interrupted evaluation resumes where it stopped.
//! Each example's random stream is derived from (seed, example index): results do not depend
//! on the batch size.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::metrics::{distinct_n, lm_loss, mean_std};
use super::rouge::{rouge_l_max, tokenize};
use super::sets::{length_bucket, load_set, EvalSet};
use crate::data::instruct::references;
use crate::data::jsonl::read_jsonl;
use crate::generate::{Sampler, SamplingConfig};
use crate::model::Model;
use crate::progress::Progress;
use crate::tokenizer::encode_example;

/// Settings of an evaluation run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Set names or jsonl paths.
    pub sets: Vec<String>,
    /// Where the built-in sets live.
    pub data_dir: PathBuf,
    /// Sampling seeds.
    pub seeds: Vec<u64>,
    /// Output directory.
    pub out: PathBuf,
    /// Decoding (temperature 1, top-k off, top-p 1, n-gram blocking 6 in the protocol).
    pub sampling: SamplingConfig,
    /// Prompts longer than this are dropped (counted).
    pub max_prompt_len: usize,
    /// Prompt + response limit.
    pub max_len: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Evaluate only the first N examples of each set.
    pub max_examples: Option<usize>,
    /// Start afresh in an output directory that holds other files or another model's (or
    /// other settings') generations, removing only what an evaluation writes.
    pub overwrite: bool,
}

/// Results of one set.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SetResult {
    /// Set name.
    pub set: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Examples dropped for a prompt over the limit.
    pub dropped: usize,
    /// Mean Rouge-L ×100 per seed.
    pub rouge_l_per_seed: BTreeMap<u64, f64>,
    /// Mean and standard deviation over seeds.
    pub rouge_l: (f64, f64),
    /// Dist-4 of the generations (mean over seeds).
    pub dist4: f64,
    /// Mean per-token NLL of the references (no sampling involved).
    pub lm_loss: f64,
    /// Rouge-L mean ± std over seeds per reference-length bucket (S-NI, UnNI).
    pub buckets: BTreeMap<String, (f64, f64, usize)>,
}

/// Parses a comma-separated seed list (non-empty, numbers, no duplicates).
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let seeds = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().with_context(|| format!("invalid seed `{p}` in the seed list `{s}`")))
        .collect::<Result<Vec<u64>>>()?;
    check_list("seed", &seeds)?;
    Ok(seeds)
}

/// A list of seeds or sets must be non-empty and name each item once.
fn check_list<T: PartialEq + std::fmt::Display>(what: &str, items: &[T]) -> Result<()> {
    if items.is_empty() {
        bail!("the {what} list is empty");
    }
    for (i, x) in items.iter().enumerate() {
        if items[..i].contains(x) {
            bail!("{what} {x} appears twice in the {what} list");
        }
    }
    Ok(())
}

impl EvalOptions {
    /// Checks the settings: non-empty set and seed lists without repeats, positive sizes.
    pub fn validate(&self) -> Result<()> {
        check_list("set", &self.sets)?;
        if self.sets.iter().any(String::is_empty) {
            bail!("the set list has an empty name");
        }
        check_list("seed", &self.seeds)?;
        if self.batch_size == 0 {
            bail!("the batch size must be at least 1");
        }
        if self.max_examples == Some(0) {
            bail!("max_examples must be at least 1");
        }
        if self.sampling.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        Ok(())
    }
}

struct Prepared {
    indices: Vec<usize>,
    prompts: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    dropped: usize,
}

fn prepare(model: &Model, set: &EvalSet, opts: &EvalOptions) -> Result<Prepared> {
    let tok = model.tokenizer()?;
    let eos = model.eos()?;
    let mut p = Prepared { indices: vec![], prompts: vec![], responses: vec![], dropped: 0 };
    let n = opts.max_examples.unwrap_or(usize::MAX).min(set.examples.len());
    // Room for at least one generated token, under both limits.
    let limit = opts.max_len.min(model.lm.info().max_positions.unwrap_or(usize::MAX));
    for (i, e) in set.examples.iter().take(n).enumerate() {
        let mut ex = encode_example(tok, &e.prompt, &e.references[0], eos)?;
        if ex.prompt.len() > opts.max_prompt_len || ex.prompt.len() >= limit {
            p.dropped += 1;
            continue;
        }
        // The LM loss scores the reference within the same total length limit.
        ex.response.truncate(limit - ex.prompt.len());
        p.indices.push(i);
        p.prompts.push(ex.prompt);
        p.responses.push(ex.response);
    }
    if p.indices.is_empty() {
        bail!(
            "evaluation set `{}`: no prompt fits (limits: {} prompt tokens, {limit} tokens in total)",
            set.name,
            opts.max_prompt_len
        );
    }
    Ok(p)
}

/// Reads the complete lines of a generations file (dropping a torn last line) and rewrites it
/// with only those.
fn resume_rows(path: &Path) -> Result<BTreeMap<usize, Value>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(BTreeMap::new()) };
    let mut rows = BTreeMap::new();
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { break };
        let Some(i) = v.get("index").and_then(Value::as_u64) else { break };
        rows.insert(i as usize, v);
        kept.push_str(line);
        kept.push('\n');
    }
    if kept.len() != text.len() {
        crate::atomic::write_file(path, kept.as_bytes())?;
    }
    Ok(rows)
}

/// Generates (or resumes) one seed of one set; returns the rows in example order.
fn run_seed(
    model: &Model,
    set: &EvalSet,
    prep: &Prepared,
    seed: u64,
    opts: &EvalOptions,
    progress: &Progress,
) -> Result<Vec<Value>> {
    let path = opts.out.join("eval").join(&set.name).join(format!("seed-{seed}.jsonl"));
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let mut rows = resume_rows(&path)?;
    progress.inc(prep.indices.iter().filter(|i| rows.contains_key(i)).count() as u64);
    let todo: Vec<usize> = (0..prep.indices.len()).filter(|&k| !rows.contains_key(&prep.indices[k])).collect();
    let tok = model.tokenizer()?;
    let eos = &model.eos_token_ids;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let prompts: Vec<Vec<u32>> = todo.iter().map(|&k| prep.prompts[k].clone()).collect();
    // Each example's stream is (seed, example index): independent of batching and resuming.
    let ids: Vec<u64> = todo.iter().map(|&k| prep.indices[k] as u64).collect();
    let cfg = SamplingConfig { max_length: Some(opts.max_len), ..opts.sampling.clone() };
    Sampler::plain(model, &cfg).decode_in_chunks(&prompts, seed, &ids, opts.batch_size, |first, samples| {
        let mut text = String::new();
        for (j, s) in samples.iter().enumerate() {
            let i = prep.indices[todo[first + j]];
            let e = &set.examples[i];
            let prediction = tok.decode_response(&s.response, eos)?;
            let refs: Vec<&str> = e.references.iter().map(String::as_str).collect();
            let row = json!({
                "index": i, "seed": seed, "prompt": e.prompt, "prediction": prediction,
                "references": e.references, "rougeL": 100.0 * rouge_l_max(&prediction, &refs), "tokens": s.response.len(),
            });
            text.push_str(&format!("{row}\n"));
            rows.insert(i, row);
        }
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        file.flush()?;
        progress.inc(samples.len() as u64);
        Ok(())
    })?;
    Ok(prep.indices.iter().map(|i| rows[i].clone()).collect())
}

fn rouge_of(rows: &[Value]) -> f64 {
    rows.iter().map(|r| r["rougeL"].as_f64().unwrap_or(0.0)).sum::<f64>() / rows.len().max(1) as f64
}

fn dist4_of(rows: &[Value]) -> f64 {
    let words: Vec<Vec<String>> =
        rows.iter().map(|r| tokenize(r["prediction"].as_str().unwrap_or(""), false)).collect();
    distinct_n(&words, 4)
}

/// Evaluates `model` on every set and seed; writes `results.json` and `results.md` in
/// `opts.out` and returns the results.
pub fn evaluate_model(model: &Model, opts: &EvalOptions) -> Result<Vec<SetResult>> {
    opts.validate()?;
    let sets: Vec<EvalSet> = opts.sets.iter().map(|s| load_set(s, &opts.data_dir)).collect::<Result<_>>()?;
    let tok = model.tokenizer()?;
    claim_output(model, opts)?;
    let mut results = Vec::new();
    for set in &sets {
        let prep = prepare(model, set, opts)?;
        if prep.dropped > 0 {
            crate::progress::note(&format!(
                "{}: {} examples evaluated, {} dropped for a prompt over {} tokens (or no room to generate)",
                set.name,
                prep.indices.len(),
                prep.dropped,
                opts.max_prompt_len
            ));
        }
        let progress = Progress::new(&format!("{:>10}", set.name), (prep.indices.len() * opts.seeds.len()) as u64);
        let started = std::time::Instant::now();
        let mut generated = 0usize;
        let mut per_seed = BTreeMap::new();
        let mut dist = Vec::new();
        let mut bucket_scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut bucket_sizes = BTreeMap::new();
        for &seed in &opts.seeds {
            let rows = run_seed(model, set, &prep, seed, opts, &progress)?;
            generated += rows.iter().map(|r| r["tokens"].as_u64().unwrap_or(0) as usize).sum::<usize>();
            per_seed.insert(seed, rouge_of(&rows));
            dist.push(dist4_of(&rows));
            if set.has_length_buckets() {
                let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
                for r in rows {
                    let i = r["index"].as_u64().unwrap_or(0) as usize;
                    let len = tok.encode(&set.examples[i].references[0])?.len();
                    groups.entry(length_bucket(len).to_string()).or_default().push(r);
                }
                for (b, g) in groups {
                    bucket_sizes.insert(b.clone(), g.len());
                    bucket_scores.entry(b).or_default().push(rouge_of(&g));
                }
            }
        }
        progress.finish();
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {generated} tokens in {secs:.1} s ({:.0} tokens/s, resumed rows included)",
            set.name,
            generated as f64 / secs
        );
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            prep.prompts.iter().cloned().zip(prep.responses.iter().cloned()).collect();
        let values: Vec<f64> = per_seed.values().copied().collect();
        results.push(SetResult {
            set: set.name.clone(),
            examples: prep.indices.len(),
            dropped: prep.dropped,
            rouge_l: mean_std(&values),
            rouge_l_per_seed: per_seed,
            dist4: dist.iter().sum::<f64>() / dist.len() as f64,
            lm_loss: lm_loss(model.lm.as_ref(), &pairs, 8192)?,
            buckets: bucket_scores
                .into_iter()
                .map(|(b, v)| {
                    let (m, s) = mean_std(&v);
                    let n = bucket_sizes[&b];
                    (b, (m, s, n))
                })
                .collect(),
        });
    }
    write_reports(&opts.out, model, &results)?;
    Ok(results)
}

/// The results as a markdown table (Rouge-L mean ± std over seeds, Dist-4, LM loss).
pub fn markdown_table(results: &[SetResult]) -> String {
    let mut s = String::from("| set | examples | Rouge-L (×100) | Dist-4 | LM loss |\n|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {:.2} ± {:.2} | {:.4} | {:.4} |\n",
            r.set, r.examples, r.rouge_l.0, r.rouge_l.1, r.dist4, r.lm_loss
        ));
        for (b, (m, sd, n)) in &r.buckets {
            s.push_str(&format!("| {} {b} | {n} | {m:.2} ± {sd:.2} | | |\n", r.set));
        }
    }
    s
}

/// Claims the output directory: the generations in it are reused only when they come from this
/// model (its weights, not its path) with these decoding settings and length limits.
fn claim_output(model: &Model, opts: &EvalOptions) -> Result<()> {
    let identity = json!({
        "model": crate::fingerprint::model(model)?,
        "sampling": opts.sampling,
        "max_prompt_len": opts.max_prompt_len,
        "max_len": opts.max_len,
    });
    let reset = |dir: &Path, ours: bool| -> Result<()> {
        crate::outdir::remove_entries(dir, &["results.json", "results.md", crate::outdir::MARKER])?;
        if ours {
            return crate::outdir::remove_entries(dir, &["eval"]);
        }
        // Someone else's directory: only the generation files an evaluation writes.
        for set in std::fs::read_dir(dir.join("eval")).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(set.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                if name.starts_with("seed-") && name.ends_with(".jsonl") {
                    std::fs::remove_file(f.path()).with_context(|| format!("removing {}", f.path().display()))?;
                }
            }
        }
        Ok(())
    };
    let has_results = |dir: &Path| dir.join("eval").exists() || dir.join("results.json").exists();
    let out = crate::outdir::OutDir {
        path: &opts.out,
        kind: "eval",
        reset: &reset,
        has_results: &has_results,
        overwrite_flag: Some("--overwrite"),
    };
    out.claim(&identity, &[], opts.overwrite)?;
    crate::atomic::clean_stale(&opts.out)
}

fn write_reports(out: &Path, model: &Model, results: &[SetResult]) -> Result<()> {
    let source = model.source.as_ref().map(|p| p.display().to_string());
    let json = serde_json::to_string_pretty(&json!({"model": source, "results": results}))?;
    crate::atomic::write_file(&out.join("results.json"), json.as_bytes())?;
    crate::atomic::write_file(&out.join("results.md"), markdown_table(results).as_bytes())
}

/// Scores predictions made elsewhere: every line needs `prediction` and `output` (a string or
/// a list; `references` is accepted too). Writes the lines with `rougeL` added to `out` and
/// returns the mean Rouge-L ×100 per seed (lines without `seed` count as seed 0).
pub fn score_predictions(input: &Path, out: &Path) -> Result<BTreeMap<u64, f64>> {
    let mut text = String::new();
    let mut per_seed: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (line, parsed) in read_jsonl(input)? {
        let at = || format!("{}:{line}", input.display());
        let mut v = parsed.with_context(at)?;
        let pred =
            v.get("prediction").and_then(Value::as_str).with_context(|| format!("{}: no string `prediction`", at()))?;
        let key = if v.get("output").is_none() && v.get("references").is_some() { "references" } else { "output" };
        let refs = references(&v, key).map_err(|e| anyhow::anyhow!("{}: no references: {e}", at()))?;
        let score = 100.0 * rouge_l_max(pred, &refs.iter().map(String::as_str).collect::<Vec<_>>());
        let seed = match v.get("seed") {
            None | Some(Value::Null) => 0,
            Some(s) => {
                s.as_u64().with_context(|| format!("{}: `seed` must be a non-negative integer, got {s}", at()))?
            }
        };
        per_seed.entry(seed).or_default().push(score);
        v["rougeL"] = json!(score);
        text.push_str(&format!("{v}\n"));
    }
    if per_seed.is_empty() {
        bail!("{}: no predictions", input.display());
    }
    crate::atomic::write_file(out, text.as_bytes())?;
    Ok(per_seed.into_iter().map(|(s, v)| (s, v.iter().sum::<f64>() / v.len() as f64)).collect())
}
