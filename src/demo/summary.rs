//! The demo's results across repeated pipelines: per model and set the mean over repeats with
//! a 95% interval (Student's t over the repeats; with one repeat, the spread over sampling
//! seeds), MiniLLM's paired difference to each baseline and whether it exceeds the noise, the
//! Table 1 layout with the precision columns, and the plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::measure::{SetMeasures, BUCKETS, SETS};
use crate::analysis::exposure::ExposureCurve;
use crate::report::{grouped_bar_svg, line_chart_svg, BarSeries, LineSeries};

/// One model's measurements in every repeat (set name → measures).
#[derive(Clone, Debug)]
pub struct ModelResults {
    /// Row label.
    pub name: String,
    /// Parameters.
    pub parameters: usize,
    /// Per repeat.
    pub repeats: Vec<BTreeMap<String, SetMeasures>>,
}

/// A mean and the half-width of its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The mean.
    pub mean: f64,
    /// Half-width of the 95% interval.
    pub half: f64,
}

impl Interval {
    fn show(&self) -> String {
        format!("{:.2} ± {:.2}", self.mean, self.half)
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    T.get(df.max(1) - 1).copied().unwrap_or(1.96)
}

/// Mean and 95% half-width of independent values (half-width NaN for one value).
pub fn interval(values: &[f64]) -> Interval {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return Interval { mean, half: f64::NAN };
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Interval { mean, half: t975(n - 1) * (var / n as f64).sqrt() }
}

impl ModelResults {
    /// A metric over repeats: mean ± 95% interval, or with one repeat the metric's own spread
    /// over sampling seeds (`seed_sd`, as ± 1 s.d.).
    fn over_repeats(
        &self,
        set: &str,
        value: impl Fn(&SetMeasures) -> f64,
        seed_sd: impl Fn(&SetMeasures) -> f64,
    ) -> Interval {
        let v: Vec<f64> = self.repeats.iter().filter_map(|r| r.get(set)).map(&value).collect();
        if v.len() == 1 {
            let m = &self.repeats[0][set];
            Interval { mean: v[0], half: seed_sd(m) }
        } else {
            interval(&v)
        }
    }

    fn rouge(&self, set: &str) -> Interval {
        self.over_repeats(set, |m| m.rouge_l.0, |m| m.rouge_l.1)
    }

    fn precision(&self, set: &str) -> Interval {
        self.over_repeats(set, |m| 100.0 * m.precision.0, |m| 100.0 * m.precision.1)
    }

    fn mean_of(&self, set: &str, f: impl Fn(&SetMeasures) -> f64) -> f64 {
        let v: Vec<f64> = self.repeats.iter().filter_map(|r| r.get(set)).map(f).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
}

/// The Table 1 layout with the claim's columns, as markdown.
pub fn main_table(models: &[ModelResults]) -> String {
    let mut s = String::from(
        "| model | parameters | test Rouge-L | held-out Rouge-L | test precision (%) | held-out precision (%) | false statements / response (test) | unparseable sentences (test, %) | response tokens (test) | Dist-4 (test) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in models {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.3} |\n",
            m.name,
            m.parameters,
            m.rouge("test").show(),
            m.rouge("held_out").show(),
            m.precision("test").show(),
            m.precision("held_out").show(),
            m.mean_of("test", |x| x.false_per_response),
            100.0 * m.mean_of("test", |x| x.unparseable),
            m.mean_of("test", |x| x.length),
            m.mean_of("test", |x| x.dist4),
        ));
    }
    s
}

/// Rouge-L by reference length (test and held-out sets pooled per bucket by their sizes).
pub fn length_table(models: &[ModelResults]) -> String {
    let mut s = String::from("| model |");
    for (b, _, _) in BUCKETS {
        s.push_str(&format!(" test {b} words |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(BUCKETS.len()));
    s.push('\n');
    for m in models {
        s.push_str(&format!("| {} |", m.name));
        for (b, _, _) in BUCKETS {
            let v = m.mean_of("test", |x| x.rouge_l_by_length.get(b).map_or(f64::NAN, |e| e.0));
            let n = m
                .repeats
                .first()
                .and_then(|r| r.get("test"))
                .and_then(|x| x.rouge_l_by_length.get(b))
                .map_or(0, |e| e.1);
            s.push_str(&format!(" {v:.2} (n={n}) |"));
        }
        s.push('\n');
    }
    s
}

/// A compared metric: its label, its set, and how to read it.
type Compared = (&'static str, &'static str, fn(&SetMeasures) -> f64);

/// MiniLLM minus each baseline, paired by repeat: mean ± 95% interval and whether it exceeds
/// the noise (the interval excludes 0). Needs at least two repeats.
pub fn comparisons(models: &[ModelResults]) -> (String, Value) {
    let Some(mini) = models.iter().find(|m| m.name == "minillm") else { return (String::new(), Value::Null) };
    let metrics: [Compared; 4] = [
        ("test Rouge-L", "test", |m| m.rouge_l.0),
        ("held-out Rouge-L", "held_out", |m| m.rouge_l.0),
        ("test precision (%)", "test", |m| 100.0 * m.precision.0),
        ("held-out precision (%)", "held_out", |m| 100.0 * m.precision.0),
    ];
    let mut s = String::from("| MiniLLM − baseline | ");
    s.push_str(&metrics.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "));
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(metrics.len()));
    s.push('\n');
    let mut json_rows = Vec::new();
    for base in models.iter().filter(|m| ["sft", "kd", "seqkd", "gkd", "opd", "distillm"].contains(&m.name.as_str())) {
        s.push_str(&format!("| {} |", base.name));
        let mut row = serde_json::Map::new();
        for (label, set, f) in metrics {
            let diffs: Vec<f64> = mini
                .repeats
                .iter()
                .zip(&base.repeats)
                .filter_map(|(a, b)| Some(f(a.get(set)?) - f(b.get(set)?)))
                .collect();
            let i = interval(&diffs);
            let verdict = if i.half.is_nan() {
                "one repeat"
            } else if i.mean - i.half > 0.0 {
                "better"
            } else if i.mean + i.half < 0.0 {
                "worse"
            } else {
                "within noise"
            };
            s.push_str(&format!(" {:+.2} ± {:.2} ({verdict}) |", i.mean, i.half));
            row.insert(
                label.into(),
                json!({"mean": i.mean, "half_width": i.half, "verdict": verdict, "per_repeat": diffs}),
            );
        }
        s.push('\n');
        json_rows.push(json!({"baseline": base.name, "differences": row}));
    }
    (s, Value::Array(json_rows))
}

/// Writes the plots; returns their paths.
pub fn plots(
    out: &Path,
    models: &[ModelResults],
    exposure: &[(String, ExposureCurve)],
    training_curves: &[(String, PathBuf)],
    teacher_length: f64,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut plot = |file: &str, svg: String| -> Result<()> {
        let p = out.join(file);
        crate::atomic::write_file(&p, svg.as_bytes())?;
        written.push(p);
        Ok(())
    };
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    let bars = |f: &dyn Fn(&ModelResults, &str) -> Interval| -> Vec<BarSeries> {
        models
            .iter()
            .map(|m| {
                let v = SETS
                    .iter()
                    .map(|s| Some(f(m, s)))
                    .map(|i| i.map(|i| (i.mean, if i.half.is_nan() { 0.0 } else { i.half })))
                    .collect();
                (m.name.clone(), v)
            })
            .collect()
    };
    plot("rouge_l.svg", grouped_bar_svg("Rouge-L (mean ± 95% interval)", "Rouge-L", &sets, &bars(&|m, s| m.rouge(s))))?;
    plot(
        "precision.svg",
        grouped_bar_svg(
            "Precision of generated statements (%)",
            "true / all statements (%)",
            &sets,
            &bars(&|m, s| m.precision(s)),
        ),
    )?;
    let buckets: Vec<String> = BUCKETS.iter().map(|b| format!("{} words", b.0)).collect();
    let by_len: Vec<BarSeries> = models
        .iter()
        .map(|m| {
            let v = BUCKETS
                .iter()
                .map(|(b, _, _)| {
                    Some((m.mean_of("test", |x| x.rouge_l_by_length.get(*b).map_or(f64::NAN, |e| e.0)), 0.0))
                })
                .collect();
            (m.name.clone(), v)
        })
        .collect();
    plot("length_buckets.svg", grouped_bar_svg("Test Rouge-L by reference length", "Rouge-L", &buckets, &by_len))?;
    let curves: Vec<LineSeries> = exposure
        .iter()
        .map(|(n, c)| {
            (n.clone(), c.ex_acc_err.iter().enumerate().filter_map(|(l, e)| e.map(|v| ((l + 1) as f64, v))).collect())
        })
        .collect();
    plot("exposure.svg", line_chart_svg("Exposure bias: ExAccErr(l)", "generation length l", "ExAccErr (%)", &curves))?;
    let series = |key: &str| -> Result<Vec<LineSeries>> {
        training_curves.iter().map(|(n, dir)| Ok((n.clone(), metric(dir, key)?))).collect()
    };
    plot(
        "reverse_kl.svg",
        line_chart_svg(
            "Reverse KL(student ‖ teacher) on validation prompts during MiniLLM",
            "optimizer step",
            "k3 estimate per token",
            &series("val_rev_kl_k3")?,
        ),
    )?;
    let mut lengths = series("val_len")?;
    let xmax = lengths.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max);
    lengths.push(("teacher (test mean)".into(), vec![(0.0, teacher_length), (xmax, teacher_length)]));
    plot(
        "response_length.svg",
        line_chart_svg("Student response length on validation prompts", "optimizer step", "tokens", &lengths),
    )?;
    let fit = super::toy::fit(&super::toy::MIXTURE);
    let [p, f, r] = super::toy::curves(&super::toy::MIXTURE, &fit);
    plot(
        "toy_gaussian.svg",
        line_chart_svg(
            "Fitting a Gaussian mixture p with one Gaussian q",
            "x",
            "density",
            &[("p (mixture)".into(), p), ("argmin KL(p‖q)".into(), f), ("argmin KL(q‖p)".into(), r)],
        ),
    )?;
    Ok(written)
}

/// `metrics.jsonl` rows of a run that carry `key`, as (step, value).
pub fn metric(run: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let path = run.join("metrics.jsonl");
    let mut points = Vec::new();
    for (line, row) in crate::data::jsonl::read_jsonl(&path)? {
        let row = row.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
        // Validation statistics are nested under `eval`.
        let value = row.get(key).or_else(|| row.get("eval").and_then(|e| e.get(key))).and_then(Value::as_f64);
        if let (Some(step), Some(v)) = (row.get("step").and_then(Value::as_f64), value) {
            points.push((step, v));
        }
    }
    Ok(points)
}

/// Everything as JSON.
pub fn to_json(models: &[ModelResults], comparisons: Value) -> Value {
    let rows: Vec<Value> = models
        .iter()
        .map(|m| {
            let sets: serde_json::Map<String, Value> = SETS
                .iter()
                .map(|s| {
                    let r = m.rouge(s);
                    let p = m.precision(s);
                    (
                        s.to_string(),
                        json!({"rouge_l": [r.mean, r.half], "precision": [p.mean, p.half],
                        "per_repeat": m.repeats.iter().map(|x| x.get(*s)).collect::<Vec<_>>()}),
                    )
                })
                .collect();
            json!({"model": m.name, "parameters": m.parameters, "sets": sets})
        })
        .collect();
    let fit = super::toy::fit(&super::toy::MIXTURE);
    json!({"models": rows, "comparisons": comparisons,
           "toy": {"forward": fit.forward, "reverse": fit.reverse, "forward_kl": fit.forward_kl, "reverse_kl": fit.reverse_kl}})
}
