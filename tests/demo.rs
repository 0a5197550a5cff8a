//! `minillm demo --quick` end to end: a teacher trained from scratch, four students (SFT, KD,
//! SeqKD, MiniLLM), evaluation over five seeds on both test sets, the table and the plots.
//! The artefacts must exist and parse, every number must be finite, and the teacher must beat
//! every student.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_demo_trains_distills_evaluates_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(["demo", "--quick", "--out"]).arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for name in ["teacher", "sft", "kd", "seqkd", "minillm"] {
        assert!(stdout.contains(&format!("| {name} |")), "the printed table has no row {name}:\n{stdout}");
        assert!(out.join(name).join("best/model.safetensors").is_file(), "{name} has no selected model");
        assert!(out.join(name).join("metrics.jsonl").is_file(), "{name} wrote no metrics");
    }
    for svg in ["rouge_l.svg", "reverse_kl.svg", "response_length.svg", "toy_gaussian.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg} is not an SVG");
        assert!(!text.contains("NaN") && !text.contains("inf"), "{svg} plots a non-finite value");
    }
    // The reverse-KL curve has a point per validation, starting at the SFT initialisation.
    let curve = std::fs::read_to_string(out.join("reverse_kl.svg")).unwrap();
    let points = curve.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(points.split_whitespace().count() >= 3, "reverse-KL curve: {points}");

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mut numbers = Vec::new();
    collect_numbers(&summary, &mut numbers);
    assert!(numbers.len() > 40 && numbers.iter().all(|x| x.is_finite()), "non-finite number in summary.json");
    let rouge = |model: &Value, set: &str| model[set]["rouge_l"][0].as_f64().unwrap();
    let models = summary["models"].as_array().unwrap();
    let teacher = &models[0];
    assert_eq!(teacher["model"], "teacher");
    for student in &models[1..] {
        assert_eq!(student["test"]["rouge_l_per_seed"].as_object().unwrap().len(), 5);
        assert!(
            rouge(teacher, "test") > rouge(student, "test"),
            "teacher {} does not beat {} {}",
            rouge(teacher, "test"),
            student["model"],
            rouge(student, "test")
        );
        assert!(student["parameters"].as_u64().unwrap() * 4 < teacher["parameters"].as_u64().unwrap());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| minillm |") && report.contains("held_out"));

    // Running it again reuses every stage (nothing retrained, same table), and a file the user
    // put into the demo's directory is left alone.
    std::fs::write(out.join("my-notes.txt"), "mine").unwrap();
    let again =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(["demo", "--quick", "--out"]).arg(&out).output().unwrap();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("== teacher"), "the second run retrained the teacher");
    let table = |s: &str| s.lines().filter(|l| l.starts_with("| ")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(table(&String::from_utf8_lossy(&again.stdout)), table(&stdout));
    assert_eq!(std::fs::read_to_string(out.join("my-notes.txt")).unwrap(), "mine");
}

fn collect_numbers(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Number(n) => out.push(n.as_f64().unwrap()),
        Value::Array(a) => a.iter().for_each(|x| collect_numbers(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_numbers(x, out)),
        // serde_json writes NaN and infinities as null.
        Value::Null => out.push(f64::NAN),
        _ => {}
    }
}
