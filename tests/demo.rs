//! `minillm demo --quick` end to end: a world, pre-trained teacher and student, the teacher
//! instruction-tuned, seven students (SFT, KD, SeqKD, MiniLLM, GKD, OPD, DistiLLM), every
//! model measured on both test sets over five sampling seeds (Rouge-L, precision of its
//! statements, lengths, exposure bias), the table and the plots. The artefacts must exist and
//! parse, every number must be finite, the teacher must beat every student on Rouge-L and
//! precision, and a second run must reuse every stage.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_demo_trains_distills_measures_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(["demo", "--quick", "--out"]).arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for name in ["teacher", "sft", "kd", "seqkd", "minillm"] {
        assert!(stdout.contains(&format!("| {name} |")), "the printed table has no row {name}:\n{stdout}");
    }
    let seed = out.join("seed-0");
    for stage in ["pretrain-teacher", "pretrain-student", "teacher"] {
        assert!(seed.join(stage).join("best/model.safetensors").is_file(), "{stage} has no selected model");
    }
    let runs: Vec<String> =
        std::fs::read_dir(&seed).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    for method in ["sft", "kd", "seqkd", "minillm"] {
        let run =
            runs.iter().find(|r| r.starts_with(&format!("{method}-lr"))).unwrap_or_else(|| panic!("no {method} run"));
        assert!(seed.join(run).join("best/model.safetensors").is_file());
        assert!(seed.join(run).join("metrics.jsonl").is_file());
    }
    for svg in [
        "rouge_l.svg",
        "precision.svg",
        "length_buckets.svg",
        "exposure.svg",
        "reverse_kl.svg",
        "response_length.svg",
        "toy_gaussian.svg",
    ] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg} is not an SVG");
        assert!(!text.contains("NaN") && !text.contains("inf"), "{svg} plots a non-finite value");
    }
    let curve = std::fs::read_to_string(out.join("reverse_kl.svg")).unwrap();
    let points = curve.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(points.split_whitespace().count() >= 2, "reverse-KL curve: {points}");

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let models = summary["results"]["models"].as_array().unwrap();
    let mut numbers = Vec::new();
    for m in models {
        for set in ["test", "held_out"] {
            for key in ["rouge_l", "precision"] {
                numbers.push(m["sets"][set][key][0].as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    assert!(numbers.len() >= 20 && numbers.iter().all(|x| x.is_finite()), "non-finite result: {numbers:?}");
    let get = |m: &Value, key: &str| m["sets"]["test"][key][0].as_f64().unwrap();
    let teacher = &models[0];
    assert_eq!(teacher["model"], "teacher");
    for student in &models[1..] {
        let per_repeat = &student["sets"]["test"]["per_repeat"][0];
        assert_eq!(per_repeat["examples"].as_u64().map(|n| n > 0), Some(true));
        for key in ["rouge_l", "precision"] {
            assert!(
                get(teacher, key) > get(student, key),
                "teacher {key} {} does not beat {} {}",
                get(teacher, key),
                student["model"],
                get(student, key)
            );
        }
        assert!(student["parameters"].as_u64().unwrap() * 4 < teacher["parameters"].as_u64().unwrap());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in ["| minillm |", "| gkd |", "| opd |", "| distillm |"] {
        assert!(report.contains(row), "report without a {row} row");
    }
    assert!(report.contains("precision"));

    // Running it again reuses every stage (nothing retrained, same table), and a file the user
    // put into the demo's directory is left alone.
    std::fs::write(out.join("my-notes.txt"), "mine").unwrap();
    let again =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(["demo", "--quick", "--out"]).arg(&out).output().unwrap();
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(!log.contains("== teacher") && !log.contains("== evaluating"), "the second run redid work:\n{log}");
    let table = |s: &str| s.lines().filter(|l| l.starts_with("| ")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(table(&String::from_utf8_lossy(&again.stdout)), table(&stdout));
    assert_eq!(std::fs::read_to_string(out.join("my-notes.txt")).unwrap(), "mine");
}
