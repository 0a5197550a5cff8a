//! `minillm calibrate` (ECE and accuracy) and `minillm exposure` (ExAccErr curves).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::json;

use super::LoadOptions;
use crate::eval::calibration::{calibration, load_classification, ClassifyTemplate};
use crate::eval::exposure::ex_acc_err;
use crate::eval::sets::load_set;
use crate::model::compat::check_compatible;
use crate::report::line_chart_svg;

/// Options of `minillm calibrate`.
pub struct CalibrateCommand {
    /// The model.
    pub load: LoadOptions,
    /// jsonl with the template's fields and `label`.
    pub data: PathBuf,
    /// `sst2` or `boolq`, unless a custom template is given.
    pub preset: Option<String>,
    /// Custom template: instruction, input with `{field}`s, comma-separated label words.
    pub custom: Option<(String, String, String)>,
    /// Confidence bins.
    pub bins: usize,
}

/// Prints ECE and accuracy (percent).
pub fn calibrate(c: CalibrateCommand) -> Result<()> {
    let template = match (&c.preset, &c.custom) {
        (_, Some((instruction, input, labels))) => ClassifyTemplate {
            instruction: instruction.clone(),
            input: input.clone(),
            label_words: labels.split(',').map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).collect(),
        },
        (Some(p), None) => ClassifyTemplate::preset(p)?,
        (None, None) => bail!("give --preset sst2|boolq or --instruction, --input and --labels"),
    };
    if template.label_words.len() < 2 {
        bail!("a classification needs at least two label words");
    }
    let model = c.load.load()?;
    let examples = load_classification(&c.data, &template)?;
    let r = calibration(&model, &template, &examples, c.bins)?;
    println!(
        "{}",
        json!({"data": c.data.display().to_string(), "ece": r.ece * 100.0, "accuracy": r.accuracy * 100.0, "examples": r.examples})
    );
    Ok(())
}

/// Options of `minillm exposure`.
pub struct ExposureCommand {
    /// The teacher.
    pub teacher: LoadOptions,
    /// One or more students.
    pub students: Vec<LoadOptions>,
    /// Prompt set (name or jsonl) and where the built-in sets are.
    pub set: String,
    /// Directory of the built-in sets.
    pub data_dir: PathBuf,
    /// Prompts used.
    pub prompts: usize,
    /// Sampled prefixes per prompt.
    pub samples: usize,
    /// Longest generation length l.
    pub max_new_tokens: usize,
    /// Seed.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
}

/// Writes `exposure.json` and `exposure.svg` (ExAccErr(l) of every student).
pub fn exposure(c: ExposureCommand) -> Result<()> {
    let teacher = c.teacher.load()?;
    let set = load_set(&c.set, &c.data_dir)?;
    let tok = teacher.tokenizer()?;
    let eos = teacher.eos_token_ids.clone();
    let pad = teacher.pad_id();
    let prompts: Vec<Vec<u32>> =
        set.examples.iter().take(c.prompts).map(|e| tok.encode(&e.prompt)).collect::<Result<_>>()?;
    let mut results = Vec::new();
    let mut series = Vec::new();
    for s in &c.students {
        let student = s.load()?;
        check_compatible(&student, &teacher)?;
        let curve = ex_acc_err(
            student.lm.as_ref(),
            teacher.lm.as_ref(),
            &prompts,
            c.samples,
            c.max_new_tokens,
            &eos,
            pad,
            c.seed,
            16,
        )?;
        let name = s.dir.file_name().map_or("student".into(), |n| n.to_string_lossy().to_string());
        let pts = curve.ex_acc_err.iter().enumerate().filter_map(|(l, e)| e.map(|v| ((l + 1) as f64, v))).collect();
        series.push((name.clone(), pts));
        results.push(json!({"student": s.dir.display().to_string(), "curve": curve}));
    }
    let out: &Path = &c.out;
    let doc = json!({"teacher": c.teacher.dir.display().to_string(), "set": set.name, "prompts": prompts.len(), "samples": c.samples, "results": results});
    crate::atomic::write_file(&out.join("exposure.json"), serde_json::to_string_pretty(&doc)?.as_bytes())?;
    let svg = line_chart_svg("Exposure bias: ExAccErr(l)", "generation length l", "ExAccErr (%)", &series);
    crate::atomic::write_file(&out.join("exposure.svg"), svg.as_bytes())?;
    eprintln!("exposure.json and exposure.svg in {}", out.display());
    Ok(())
}
