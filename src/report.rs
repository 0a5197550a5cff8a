//! Reports: the paper's Table 1 layout (methods × evaluation sets) from several evaluation
//! runs, and plots written as plain SVG (no font or image libraries needed on a headless
//! machine).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::eval::evaluate::SetResult;

/// Display names of the built-in sets, in the paper's column order.
const COLUMNS: &[(&str, &str)] = &[
    ("dolly", "DollyEval"),
    ("self-inst", "SelfInst"),
    ("vicuna", "VicunaEval"),
    ("sinst", "S-NI"),
    ("uinst", "UnNI"),
];

/// The results of one evaluated model.
#[derive(Clone, Debug)]
pub struct RunResults {
    /// Row label (the run directory's name).
    pub label: String,
    /// Per-set results.
    pub results: Vec<SetResult>,
}

#[derive(Deserialize)]
struct ResultsFile {
    results: Vec<SetResult>,
}

/// Reads `results.json` of an evaluation directory (`minillm eval --out DIR`).
pub fn load_results(dir: &Path) -> Result<RunResults> {
    let path = if dir.is_file() { dir.to_path_buf() } else { dir.join("results.json") };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `minillm eval --out {}` first)", path.display(), dir.display()))?;
    let file: ResultsFile =
        serde_json::from_str(&text).with_context(|| format!("{} is not an evaluation result", path.display()))?;
    let dir = if dir.is_file() { dir.parent().unwrap_or(Path::new(".")) } else { dir };
    let label = run_label(dir).trim_start_matches("eval-").to_string();
    Ok(RunResults { label, results: file.results })
}

/// A short name for a model or output directory: its last component, with the names of its
/// parents prepended while that component is a generic one (`best`, `step-N`, `eval`,
/// `checkpoints`), e.g. `runs/sft/best` → `sft-best`, `runs/kd/checkpoints/step-200` →
/// `kd-step-200`.
pub fn run_label(dir: &Path) -> String {
    let generic = |n: &str| matches!(n, "best" | "eval" | "checkpoints" | "." | "..") || n.starts_with("step-");
    let mut parts: Vec<String> = Vec::new();
    for c in dir.components().rev() {
        let name = c.as_os_str().to_string_lossy().to_string();
        if name != "checkpoints" {
            parts.push(name.clone());
        }
        if !generic(&name) {
            break;
        }
    }
    parts.reverse();
    if parts.is_empty() {
        "model".into()
    } else {
        parts.join("-")
    }
}

/// Makes labels unique by numbering repeats (`best`, `best (2)`).
pub fn unique_labels(labels: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(labels.len());
    for l in labels {
        let n = out.iter().filter(|o| **o == l || o.starts_with(&format!("{l} ("))).count();
        out.push(if n == 0 { l } else { format!("{l} ({})", n + 1) });
    }
    out
}

/// Set names in display order: the paper's five first, then any others.
fn set_order(runs: &[RunResults]) -> Vec<String> {
    let mut names: Vec<String> = COLUMNS.iter().map(|(n, _)| n.to_string()).collect();
    for r in runs.iter().flat_map(|r| &r.results) {
        if !names.contains(&r.set) {
            names.push(r.set.clone());
        }
    }
    names.retain(|n| runs.iter().any(|r| r.results.iter().any(|s| &s.set == n)));
    names
}

fn display(set: &str) -> String {
    COLUMNS.iter().find(|(n, _)| *n == set).map_or(set.to_string(), |(_, d)| d.to_string())
}

/// Rouge-L (mean ± std over seeds) of every run on every set, as a markdown table.
pub fn comparison_markdown(runs: &[RunResults]) -> String {
    let sets = set_order(runs);
    let mut s = String::from("| model |");
    for set in &sets {
        let _ = write!(s, " {} |", display(set));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(sets.len()));
    s.push('\n');
    for run in runs {
        let _ = write!(s, "| {} |", run.label);
        for set in &sets {
            match run.results.iter().find(|r| &r.set == set) {
                Some(r) => {
                    let _ = write!(s, " {:.2} ± {:.2} |", r.rouge_l.0, r.rouge_l.1);
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

const PALETTE: &[&str] = &["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Chart geometry shared by the plots: canvas, margins (the right one holds the legend) and
/// plot area.
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const PLOT_H: f64 = HEIGHT - TOP - BOTTOM;

/// The opening of a chart: the `<svg>` element, a white background and the title.
fn open_svg(title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12"><rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + PLOT_W / 2.0,
        escape(title)
    )
}

/// A horizontal grid line at `y` (pixels) labelled with the value `v`.
fn grid_line(s: &mut String, y: f64, v: f64) {
    let _ = write!(s, r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##, LEFT + PLOT_W);
    let _ = write!(
        s,
        r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
        LEFT - 6.0,
        y + 4.0,
        (v * 1e6).round() / 1e6
    );
}

/// Legend entry `k`: a colour key and the series name, in the right margin.
fn legend_entry(s: &mut String, k: usize, name: &str) {
    let y = TOP + 10.0 + 20.0 * k as f64;
    let color = PALETTE[k % PALETTE.len()];
    let _ = write!(s, r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/>"#, WIDTH - RIGHT + 16.0, y - 10.0);
    let _ = write!(s, r#"<text x="{}" y="{y}">{}</text>"#, WIDTH - RIGHT + 34.0, escape(name));
}

/// A value axis maximum with a round step: (top, step).
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 && max.is_finite() { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// One named series of a bar chart: per category, the mean and error bar (absent = no bar).
pub type BarSeries = (String, Vec<Option<(f64, f64)>>);

/// A grouped bar chart with error bars: one group per category, one bar per series.
pub fn grouped_bar_svg(title: &str, y_label: &str, categories: &[String], series: &[BarSeries]) -> String {
    let (left, top, pw, ph) = (LEFT, TOP, PLOT_W, PLOT_H);
    let max = series.iter().flat_map(|(_, v)| v.iter().flatten()).map(|(m, e)| m + e).fold(0.0, f64::max);
    let (ymax, step) = nice_axis(max);
    let y = |v: f64| top + ph * (1.0 - v / ymax);
    let mut s = open_svg(title);
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let yy = y(v);
        grid_line(&mut s, yy, v);
        v += step;
    }
    let _ = write!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    let group_w = pw / categories.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (c, cat) in categories.iter().enumerate() {
        let gx = left + group_w * c as f64 + group_w * 0.1;
        for (k, (_, values)) in series.iter().enumerate() {
            if let Some(Some((m, e))) = values.get(c) {
                let x = gx + bar_w * k as f64;
                let color = PALETTE[k % PALETTE.len()];
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                    y(*m),
                    bar_w * 0.92,
                    (y(0.0) - y(*m)).max(0.0)
                );
                let cx = x + bar_w * 0.46;
                let _ = write!(
                    s,
                    r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                    y((m - e).max(0.0)),
                    y(m + e)
                );
            }
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            left + group_w * (c as f64 + 0.5),
            top + ph + 20.0,
            escape(cat)
        );
    }
    let _ = write!(s, r#"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#, left + pw, y(0.0), y(0.0));
    for (k, (name, _)) in series.iter().enumerate() {
        legend_entry(&mut s, k, name);
    }
    s.push_str("</svg>\n");
    s
}

/// `minillm report`: the comparison table and bar chart of several evaluation runs, written
/// to `out` (`report.md`, `rouge_l.svg`); returns the table.
pub fn write_report(dirs: &[PathBuf], out: &Path) -> Result<String> {
    if dirs.is_empty() {
        bail!("give at least one evaluation directory");
    }
    let mut runs: Vec<RunResults> = dirs.iter().map(|d| load_results(d)).collect::<Result<_>>()?;
    let labels = unique_labels(runs.iter().map(|r| r.label.clone()).collect());
    for (r, l) in runs.iter_mut().zip(labels) {
        r.label = l;
    }
    let sets = set_order(&runs);
    let table = comparison_markdown(&runs);
    let series: Vec<BarSeries> = runs
        .iter()
        .map(|r| {
            let v = sets.iter().map(|s| r.results.iter().find(|x| &x.set == s).map(|x| x.rouge_l)).collect();
            (r.label.clone(), v)
        })
        .collect();
    let labels: Vec<String> = sets.iter().map(|s| display(s)).collect();
    let svg = grouped_bar_svg("Rouge-L (mean ± std over seeds)", "Rouge-L", &labels, &series);
    crate::atomic::write_file(&out.join("report.md"), format!("# Rouge-L\n\n{table}").as_bytes())?;
    crate::atomic::write_file(&out.join("rouge_l.svg"), svg.as_bytes())?;
    Ok(table)
}

/// One named curve of a line chart: (x, y) points.
pub type LineSeries = (String, Vec<(f64, f64)>);

/// A line chart of several curves (y axis from the smallest value or 0, whichever is lower).
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[LineSeries]) -> String {
    let (left, top, pw, ph) = (LEFT, TOP, PLOT_W, PLOT_H);
    let points = || series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let xmax = points().map(|p| p.0).fold(1.0, f64::max);
    let ymax = points().map(|p| p.1).fold(0.0, f64::max);
    let ymin = points().map(|p| p.1).fold(0.0, f64::min);
    let (top_v, step) = nice_axis(ymax - ymin);
    let base = if ymin < 0.0 { -(((-ymin) / step).ceil() * step) } else { 0.0 };
    let span = (top_v + base.abs()).max(step);
    let px = |x: f64| left + pw * x / xmax;
    let py = |y: f64| top + ph * (1.0 - (y - base) / span);
    let mut s = open_svg(title);
    let mut v = base;
    while v <= base + span + 1e-9 {
        let yy = py(v);
        grid_line(&mut s, yy, v);
        v += step;
    }
    for k in 0..=4 {
        let x = xmax * k as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            top + ph + 18.0,
            (x * 100.0).round() / 100.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        HEIGHT - 12.0,
        escape(x_label)
    );
    let _ = write!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        legend_entry(&mut s, k, name);
    }
    let _ = write!(s, r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="black"/>"#, top + ph);
    s.push_str("</svg>\n");
    s
}
