//! Per-token scoring equals `transformers`' log-softmax at the scored tokens, regardless of
//! batching; `minillm score` reports malformed input by file and line.

mod common;

use common::*;
use minillm::score::{score, ScoreRequest};

#[test]
fn scores_equal_transformers_log_probs_under_any_batching() {
    for name in ["gpt2", "opt", "llama"] {
        let model = load(name);
        let r = reference(name);
        let ids = r["right.input_ids"].to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let mask = rows_u8(&r["right.attention_mask"]);
        let lp = minillm::model::log_softmax_last(&r["right.logits"]).unwrap().to_vec3::<f32>().unwrap();
        let reqs: Vec<ScoreRequest> = ids
            .iter()
            .zip(&mask)
            .enumerate()
            .map(|(b, (row, m))| {
                let n = m.iter().filter(|&&x| x == 1).count();
                ScoreRequest { ids: row[..n].iter().map(|&t| t as u32).collect(), score_from: 1 + b % 2 }
            })
            .collect();
        let expect: Vec<Vec<f32>> = reqs
            .iter()
            .enumerate()
            .map(|(b, q)| (q.score_from..q.ids.len()).map(|j| lp[b][j - 1][q.ids[j] as usize]).collect())
            .collect();
        for budget in [1, 20, 1 << 16] {
            let got = score(model.lm.as_ref(), &reqs, budget).unwrap();
            for (b, (g, e)) in got.iter().zip(&expect).enumerate() {
                assert_eq!(g.logprobs.len(), e.len());
                for (x, y) in g.logprobs.iter().zip(e) {
                    assert!((x - y).abs() < 1e-4, "{name} row {b} budget {budget}: {x} vs {y}");
                }
                let total: f64 = e.iter().map(|&x| x as f64).sum();
                assert!((g.total - total).abs() < 1e-3);
            }
        }
    }
}

#[test]
fn out_of_range_requests_are_refused() {
    let model = load("gpt2");
    let too_long = ScoreRequest { ids: vec![1; 65], score_from: 1 };
    assert!(score(model.lm.as_ref(), &[too_long], 1024).unwrap_err().to_string().contains("at most 64"));
    let bad_id = ScoreRequest { ids: vec![1, 999], score_from: 1 };
    assert!(score(model.lm.as_ref(), &[bad_id], 1024).unwrap_err().to_string().contains("999"));
    let from0 = ScoreRequest { ids: vec![1, 2], score_from: 0 };
    assert!(score(model.lm.as_ref(), &[from0], 1024).is_err());
}

#[test]
fn score_command_reports_bad_lines_and_writes_one_line_per_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/gpt2");
    let input = tmp.path().join("in.jsonl");
    let out = tmp.path().join("out.jsonl");
    let score = |input: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_minillm"))
            .args(["score", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap()
    };
    std::fs::write(&input, "{\"text\": \"hello there\"}\n\n{\"prompt\": \"Q: 1+1\\n\", \"response\": \"2\"}\n")
        .unwrap();
    assert!(score(&input).status.success());
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["line"], 3);
    let ids = rows[1]["ids"].as_array().unwrap();
    assert_eq!(ids.last().unwrap(), 0, "response scoring ends with EOS");
    let n_scored = rows[1]["logprobs"].as_array().unwrap().len();
    assert_eq!(ids.len() - rows[1]["scored_from"].as_u64().unwrap() as usize, n_scored);

    for (content, expect) in [
        ("{\"text\": \"ok\"}\n{\"text\": \"broken\"\n", "in.jsonl:2: invalid JSON"),
        ("{\"prompt\": \"only a prompt\"}\n", "in.jsonl:1: expected a string field `text`"),
        ("{\"text\": 5}\n", "in.jsonl:1"),
    ] {
        std::fs::write(&input, content).unwrap();
        let run = score(&input);
        let e = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && e.contains(expect), "{e}");
    }
    let run = score(&tmp.path().join("missing.jsonl"));
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && e.contains("missing.jsonl"), "{e}");
}
