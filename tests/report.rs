//! `minillm report`: the Table 1 layout and the bar chart from evaluation results.

use minillm::eval::evaluate::SetResult;
use minillm::report::{comparison_markdown, grouped_bar_svg, write_report};

fn result(set: &str, m: f64, s: f64) -> SetResult {
    SetResult {
        set: set.into(),
        examples: 10,
        dropped: 0,
        rouge_l_per_seed: [(10, m - s), (20, m + s)].into_iter().collect(),
        rouge_l: (m, s),
        dist4: 0.9,
        lm_loss: 2.0,
        buckets: Default::default(),
    }
}

#[test]
fn report_lays_out_models_by_sets_and_draws_the_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, rs: Vec<SetResult>| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("results.json"), serde_json::json!({"model": name, "results": rs}).to_string()).unwrap();
        d
    };
    let a = write("eval-sft", vec![result("vicuna", 14.7, 0.3), result("dolly", 23.3, 0.2)]);
    let b = write("eval-minillm", vec![result("dolly", 24.6, 0.4), result("mine", 5.0, 1.0)]);
    let table = write_report(&[a, b], &tmp.path().join("report")).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "| model | DollyEval | VicunaEval | mine |");
    assert_eq!(lines[2], "| sft | 23.30 ± 0.20 | 14.70 ± 0.30 | – |");
    assert_eq!(lines[3], "| minillm | 24.60 ± 0.40 | – | 5.00 ± 1.00 |");
    let svg = std::fs::read_to_string(tmp.path().join("report/rouge_l.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<rect").count(), 1 + 4 + 2, "background, four bars, two legend keys");
    assert!(svg.contains(">DollyEval<") && svg.contains(">minillm<"));
    let e = write_report(&[tmp.path().join("nothing")], &tmp.path().join("r")).unwrap_err();
    assert!(format!("{e:#}").contains("results.json"));
    assert_eq!(comparison_markdown(&[]).lines().count(), 2);
    assert!(grouped_bar_svg("t", "y", &[], &[]).contains("</svg>"));
}
