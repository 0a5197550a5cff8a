//! Exposure bias: ExAccErr(l) of the paper's Appendix B.5 (after Arora et al. 2022).
//!
//! R(l) = Σ_{t ≤ l} E_{y<t ~ q, y_t ~ p}[log p/q] is the accumulated regret along prefixes the
//! student generates; l·ε(l) the same along prefixes the teacher generates. The inner
//! expectation over y_t ~ p is computed exactly as KL(p_t ‖ q_t) over the vocabulary; prefixes
//! are sampled (several per prompt), with common random numbers for the two runs.
//! ExAccErr(l) = (R(l) − l·ε(l)) / (l·ε(l)) × 100%.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::json;

use crate::generate::{consecutive_rows, MixedSampling, Sampler};
use crate::model::compat::check_compatible;
use crate::model::{CausalLm, Model};
use crate::report::line_chart_svg;

/// The curves, indexed by generation length l = 1..=max_new_tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExposureCurve {
    /// R(l).
    pub regret: Vec<f64>,
    /// l·ε(l).
    pub oracle: Vec<f64>,
    /// ExAccErr(l) in percent (`None` where l·ε(l) is 0).
    pub ex_acc_err: Vec<Option<f64>>,
}

/// Mean over rows of the cumulative per-step KL up to each length (a finished row keeps its
/// total).
fn cumulative(per_row: &[Vec<f32>], len: usize) -> Vec<f64> {
    let mut out = vec![0f64; len];
    for row in per_row {
        let mut acc = 0f64;
        for (l, slot) in out.iter_mut().enumerate() {
            acc += row.get(l).copied().unwrap_or(0.0) as f64;
            *slot += acc;
        }
    }
    let n = per_row.len().max(1) as f64;
    out.iter().map(|v| v / n).collect()
}

/// ExAccErr of `student` against `teacher` on `prompts`, with `samples` sampled prefixes per
/// prompt and lengths up to `max_new_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn ex_acc_err(
    student: &dyn CausalLm,
    teacher: &dyn CausalLm,
    prompts: &[Vec<u32>],
    samples: usize,
    max_new_tokens: usize,
    eos: &[u32],
    pad: u32,
    seed: u64,
    batch: usize,
) -> Result<ExposureCurve> {
    if prompts.is_empty() || samples == 0 || max_new_tokens == 0 {
        bail!("exposure bias needs prompts, samples ≥ 1 and max_new_tokens ≥ 1");
    }
    let rows: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), samples)).collect();
    let ids = consecutive_rows(0, rows.len());
    let run = |alpha: f32| -> Result<Vec<Vec<f32>>> {
        let cfg = MixedSampling {
            alpha,
            max_new_tokens,
            max_length: None,
            keep_teacher_hidden: false,
            record_forward_kl: true,
        };
        let sampler = Sampler::mixed_lm(student, teacher, &cfg, eos, pad);
        let samples = sampler.decode_in_chunks(&rows, seed, &ids, batch, |_, _| Ok(()))?;
        Ok(samples.into_iter().map(|s| s.forward_kl).collect())
    };
    // α = 0: prefixes from the student; α = 1: prefixes from the teacher.
    let regret = cumulative(&run(0.0)?, max_new_tokens);
    let oracle = cumulative(&run(1.0)?, max_new_tokens);
    let ex_acc_err = regret.iter().zip(&oracle).map(|(r, o)| (*o > 0.0).then(|| 100.0 * (r - o) / o)).collect();
    Ok(ExposureCurve { regret, oracle, ex_acc_err })
}

/// How ExAccErr is measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ExposureSettings {
    /// Sampled prefixes per prompt (10 in the paper).
    pub samples: usize,
    /// Longest generation length l.
    pub max_new_tokens: usize,
    /// Seed of the sampled prefixes.
    pub seed: u64,
    /// Rows decoded together.
    pub batch: usize,
}

/// ExAccErr(l) of each student (a label and its directory, loaded one at a time with `load`)
/// against `teacher` on `prompts` (from the prompt set named `set`); writes `exposure.json` and `exposure.svg` (one curve per
/// student) into `out`.
pub fn write_exposure(
    teacher: &Model,
    students: &[(String, PathBuf)],
    load: impl Fn(&Path) -> Result<Model>,
    set: &str,
    prompts: &[Vec<u32>],
    settings: &ExposureSettings,
    out: &Path,
) -> Result<Vec<ExposureCurve>> {
    let (mut curves, mut results, mut series) = (Vec::new(), Vec::new(), Vec::new());
    for (name, dir) in students {
        let student = load(dir)?;
        check_compatible(&student, teacher)?;
        let curve = ex_acc_err(
            student.lm.as_ref(),
            teacher.lm.as_ref(),
            prompts,
            settings.samples,
            settings.max_new_tokens,
            &teacher.eos_token_ids,
            teacher.pad_id(),
            settings.seed,
            settings.batch,
        )?;
        let pts = curve.ex_acc_err.iter().enumerate().filter_map(|(l, e)| e.map(|v| ((l + 1) as f64, v))).collect();
        series.push((name.clone(), pts));
        results.push(json!({"student": dir.display().to_string(), "label": name, "curve": curve}));
        curves.push(curve);
    }
    let teacher_dir = teacher.source.as_ref().map(|p| p.display().to_string());
    let doc = json!({"teacher": teacher_dir, "set": set, "prompts": prompts.len(), "samples": settings.samples, "results": results});
    crate::atomic::write_file(&out.join("exposure.json"), serde_json::to_string_pretty(&doc)?.as_bytes())?;
    let svg = line_chart_svg("Exposure bias: ExAccErr(l)", "generation length l", "ExAccErr (%)", &series);
    crate::atomic::write_file(&out.join("exposure.svg"), svg.as_bytes())?;
    Ok(curves)
}
