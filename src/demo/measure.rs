//! What the demo measures of each model: the paper's evaluation protocol (Rouge-L over five
//! sampling seeds, Dist-4, LM loss) on the in-distribution test prompts and the held-out
//! families, and beyond it the claim itself — the precision of the generated statements
//! (checked against the world), the hallucination rate, the response length, Rouge-L by
//! reference length (the paper's Figure 7 split) — and exposure bias (ExAccErr curves).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plan::{Plan, MAX_LEN, MAX_PROMPT_LEN};
use super::tasks::Family;
use super::world::{Checker, Verdict, World};
use crate::analysis::exposure::{ex_acc_err, ExposureCurve};
use crate::data::jsonl::read_jsonl;
use crate::eval::evaluate::{evaluate_model, EvalOptions};
use crate::eval::metrics::mean_std;
use crate::generate::SamplingConfig;
use crate::model::{load_model_as, Model, Weights};
use crate::progress::note;

/// The two evaluation sets.
pub const SETS: [&str; 2] = ["test", "held_out"];

/// Reference-length buckets (words of the first reference), the paper's Figure 7 split scaled
/// to this task's lengths.
pub const BUCKETS: [(&str, usize, usize); 3] = [("≤10", 0, 10), ("11–30", 11, 30), ("≥31", 31, usize::MAX)];

/// One model's measurements on one set: each a mean over the sampling seeds with its standard
/// deviation over seeds. (JSON writes an undefined value, NaN, as `null`; it reads back as NaN.)
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SetMeasures {
    /// Rouge-L ×100.
    #[serde(deserialize_with = "nan::pair")]
    pub rouge_l: (f64, f64),
    /// Rouge-L of the single-answer and of the multi-answer families.
    #[serde(deserialize_with = "nan::number")]
    pub rouge_l_single: f64,
    /// Multi-answer families.
    #[serde(deserialize_with = "nan::number")]
    pub rouge_l_multi: f64,
    /// Rouge-L per reference-length bucket (mean over seeds) and the bucket's size.
    #[serde(deserialize_with = "nan::buckets")]
    pub rouge_l_by_length: BTreeMap<String, (f64, usize)>,
    /// True statements / all statements, over all responses of a seed.
    #[serde(deserialize_with = "nan::pair")]
    pub precision: (f64, f64),
    /// False statements per response.
    #[serde(deserialize_with = "nan::number")]
    pub false_per_response: f64,
    /// Share of sentences the checker cannot parse.
    #[serde(deserialize_with = "nan::number")]
    pub unparseable: f64,
    /// Mean response length in tokens.
    #[serde(deserialize_with = "nan::number")]
    pub length: f64,
    /// Dist-4.
    #[serde(deserialize_with = "nan::number")]
    pub dist4: f64,
    /// LM loss of the references.
    #[serde(deserialize_with = "nan::number")]
    pub lm_loss: f64,
    /// Examples evaluated.
    pub examples: usize,
}

/// Evaluates the model in `model_dir` into `out` (resumable) on the `sets` of `data` (file
/// stems: `test`, `held_out`, or `valid` for design work) with the sampling `seeds`.
pub fn measure(
    model_dir: &Path,
    data: &Path,
    out: &Path,
    world: &World,
    plan: &Plan,
    sets: &[&str],
    seeds: &[u64],
) -> Result<BTreeMap<String, SetMeasures>> {
    let summary = out.join("measures.json");
    // The measures are reused only for the same weights; another model's evaluation in this
    // (demo-owned) directory is replaced, never reported.
    let print_file = out.join("measures.model");
    let print = crate::fingerprint::model_dir(model_dir)?;
    let same_model = std::fs::read_to_string(&print_file).is_ok_and(|p| p == print);
    if same_model {
        if let Ok(Ok(m)) = std::fs::read_to_string(&summary).map(|t| serde_json::from_str(&t)) {
            return Ok(m);
        }
    }
    note(&format!("== evaluating {} ==", model_dir.display()));
    let model = load_model_as(model_dir, &Device::Cpu, DType::F32, Weights::Frozen)?;
    let opts = EvalOptions {
        sets: sets.iter().map(|s| data.join(format!("{s}.jsonl")).display().to_string()).collect(),
        data_dir: data.to_path_buf(),
        seeds: seeds.to_vec(),
        out: out.to_path_buf(),
        sampling: SamplingConfig { no_repeat_ngram_size: 6, ..SamplingConfig::sampling(MAX_LEN) },
        max_prompt_len: MAX_PROMPT_LEN,
        max_len: MAX_LEN,
        batch_size: 64,
        max_examples: Some(plan.eval_examples),
        overwrite: !same_model && out.exists(),
    };
    let results = evaluate_model(&model, &opts)?;
    let checker = Checker::new(world);
    let mut all = BTreeMap::new();
    for r in results {
        let rows_file = |seed: u64| out.join("eval").join(&r.set).join(format!("seed-{seed}.jsonl"));
        let families = families_of(&data.join(format!("{}.jsonl", r.set)))?;
        let mut m = SetMeasures {
            rouge_l: r.rouge_l,
            dist4: r.dist4,
            lm_loss: r.lm_loss,
            examples: r.examples,
            ..Default::default()
        };
        let (mut precisions, mut falses, mut unparse, mut lens) = (vec![], vec![], vec![], vec![]);
        let (mut single, mut multi) = (vec![], vec![]);
        let mut buckets: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
        for &seed in seeds {
            let rows = rows(&rows_file(seed))?;
            let mut verdict = Verdict::default();
            let (mut s, mut mu) = (vec![], vec![]);
            let mut by_bucket: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            for row in &rows {
                let pred = row["prediction"].as_str().unwrap_or("");
                verdict.add(&checker.check(pred));
                let rouge = row["rougeL"].as_f64().unwrap_or(0.0);
                let i = row["index"].as_u64().unwrap_or(0) as usize;
                match families.get(i).copied().flatten() {
                    Some(f) if f.is_multi_answer() => mu.push(rouge),
                    _ => s.push(rouge),
                }
                let words = row["references"][0].as_str().unwrap_or("").split_whitespace().count();
                let bucket = BUCKETS.iter().find(|(_, lo, hi)| (*lo..=*hi).contains(&words)).map_or("?", |b| b.0);
                by_bucket.entry(bucket).or_default().push(rouge);
                lens.push(row["tokens"].as_f64().unwrap_or(0.0));
            }
            precisions.push(verdict.precision());
            falses.push(verdict.false_statements as f64 / rows.len().max(1) as f64);
            unparse.push(verdict.unparseable as f64 / verdict.sentences.max(1) as f64);
            single.push(mean(&s));
            multi.push(mean(&mu));
            for (b, v) in by_bucket {
                let e = buckets.entry(b.to_string()).or_default();
                e.0.push(mean(&v));
                e.1 = v.len();
            }
        }
        m.precision = mean_std(&precisions);
        m.false_per_response = mean(&falses);
        m.unparseable = mean(&unparse);
        m.length = mean(&lens);
        m.rouge_l_single = mean(&single);
        m.rouge_l_multi = mean(&multi);
        m.rouge_l_by_length = buckets.into_iter().map(|(b, (v, n))| (b, (mean(&v), n))).collect();
        all.insert(r.set.clone(), m);
    }
    crate::atomic::write_file(&summary, serde_json::to_string_pretty(&all)?.as_bytes())?;
    crate::atomic::write_file(&print_file, print.as_bytes())?;
    Ok(all)
}

/// ExAccErr curves of every student against the teacher on the first test prompts (written to
/// `out`; a curve is reused only for the same student and teacher weights).
pub fn exposure(
    teacher: &Path,
    students: &[(String, PathBuf)],
    data: &Path,
    out: &Path,
    plan: &Plan,
    seed: u64,
) -> Result<Vec<(String, ExposureCurve)>> {
    /// The curves with the fingerprints of the models (and teacher) they were measured on: a
    /// curve is reused only for the same weights.
    #[derive(Serialize, Deserialize)]
    struct Saved {
        curves: Vec<(String, ExposureCurve)>,
        #[serde(default)]
        fingerprints: Vec<String>,
        #[serde(default)]
        teacher: String,
    }
    let teacher_print = crate::fingerprint::model_dir(teacher)?;
    let prints: Vec<String> = students.iter().map(|(_, d)| crate::fingerprint::model_dir(d)).collect::<Result<_>>()?;
    let saved = std::fs::read_to_string(out).ok().and_then(|t| serde_json::from_str::<Saved>(&t).ok());
    let mut known: std::collections::HashMap<(String, String), ExposureCurve> = saved
        .filter(|s| s.teacher == teacher_print)
        .map(|s| s.curves.into_iter().zip(s.fingerprints).map(|((name, c), print)| ((name, print), c)).collect())
        .unwrap_or_default();
    // The saved curve of each student with these weights, or none.
    let mut curves: Vec<(String, Option<ExposureCurve>)> =
        students.iter().zip(&prints).map(|((n, _), p)| (n.clone(), known.remove(&(n.clone(), p.clone())))).collect();
    if curves.iter().any(|(_, c)| c.is_none()) {
        note("== exposure bias ==");
        let teacher = load_model_as(teacher, &Device::Cpu, DType::F32, Weights::Frozen)?;
        let tok = teacher.tokenizer()?;
        let (n, samples, len) = plan.exposure;
        let prompts: Vec<Vec<u32>> = read_jsonl(&data.join("test.jsonl"))?
            .into_iter()
            .take(n)
            .map(|(_, r)| -> Result<Vec<u32>> {
                let r = r?;
                tok.encode(r["prompt"].as_str().context("a test record without a prompt")?)
            })
            .collect::<Result<_>>()?;
        for ((_, curve), (_, dir)) in curves.iter_mut().zip(students).filter(|((_, c), _)| c.is_none()) {
            let student: Model = load_model_as(dir, &Device::Cpu, DType::F32, Weights::Frozen)?;
            *curve = Some(ex_acc_err(
                student.lm.as_ref(),
                teacher.lm.as_ref(),
                &prompts,
                samples,
                len,
                &teacher.eos_token_ids,
                teacher.pad_id(),
                seed,
                64,
            )?);
        }
    }
    let curves: Vec<(String, ExposureCurve)> = curves
        .into_iter()
        .map(|(n, c)| c.map(|c| (n.clone(), c)).with_context(|| format!("no exposure curve for {n}")))
        .collect::<Result<_>>()?;
    let saved = Saved { curves: curves.clone(), fingerprints: prints, teacher: teacher_print };
    crate::atomic::write_file(out, serde_json::to_string(&saved)?.as_bytes())?;
    Ok(curves)
}

fn rows(path: &Path) -> Result<Vec<Value>> {
    read_jsonl(path)?.into_iter().map(|(_, r)| r).collect()
}

fn families_of(path: &Path) -> Result<Vec<Option<Family>>> {
    Ok(read_jsonl(path)?
        .into_iter()
        .map(|(_, r)| r.ok().and_then(|r| r.get("family").and_then(Value::as_str).and_then(Family::from_name)))
        .collect())
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Reading back NaN that JSON wrote as `null`.
mod nan {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn pair<'de, D: Deserializer<'de>>(d: D) -> Result<(f64, f64), D::Error> {
        let (a, b) = <(Option<f64>, Option<f64>)>::deserialize(d)?;
        Ok((a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)))
    }

    pub fn buckets<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, (f64, usize)>, D::Error> {
        let m = BTreeMap::<String, (Option<f64>, usize)>::deserialize(d)?;
        Ok(m.into_iter().map(|(k, (v, n))| (k, (v.unwrap_or(f64::NAN), n))).collect())
    }
}
