//! The demo's synthetic task: every text tokenises without unknown words, splits never share
//! an instruction, every answer is right (checked by recomputing it from the instruction),
//! and test records carry every valid answer.

use std::collections::BTreeSet;

use minillm::data::jsonl::read_jsonl;
use minillm::demo::synthetic::{self, draw, split_of, Family, Sizes, Split};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn sizes() -> Sizes {
    Sizes { train: 2000, valid: 60, test: 120, held_out: 40, corpus_docs: 50 }
}

fn rows(path: &std::path::Path) -> Vec<Value> {
    read_jsonl(path).unwrap().into_iter().map(|(_, r)| r.unwrap()).collect()
}

fn instruction(row: &Value) -> String {
    let p = row["prompt"].as_str().unwrap();
    p.trim_start_matches("Instruction : ").trim_end_matches("\nResponse :\n").to_string()
}

/// The single right answer of a single-answer instruction, computed from its text.
fn solve(instr: &str) -> Option<String> {
    let words: Vec<&str> = instr.split_whitespace().collect();
    match words.as_slice() {
        ["copy", ":", rest @ ..] => Some(rest.join(" ")),
        ["reverse", ":", rest @ ..] => Some(rest.iter().rev().copied().collect::<Vec<_>>().join(" ")),
        ["sort", ":", rest @ ..] => {
            let mut v: Vec<u32> = rest.iter().map(|w| w.parse().unwrap()).collect();
            v.sort();
            Some(v.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
        }
        ["add", a, "and", b] | ["what", "is", a, "plus", b] => {
            let (x, y): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            Some(format!("{x} plus {y} is {}", x + y))
        }
        _ => None,
    }
}

#[test]
fn dataset_is_disjoint_complete_correct_and_in_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic::write_dataset(tmp.path(), &sizes(), 7).unwrap();
    let tok = minillm::tokenizer::Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    let unk = tok.token_to_id("<unk>").unwrap();
    assert_eq!(tok.token_to_id(synthetic::EOS_TOKEN), Some(0));

    let mut by_split = Vec::new();
    for (file, n) in [("train.jsonl", 2000), ("valid.jsonl", 60), ("test.jsonl", 120), ("held_out.jsonl", 40)] {
        let rs = rows(&tmp.path().join(file));
        assert_eq!(rs.len(), n, "{file}");
        let mut instructions = BTreeSet::new();
        for r in &rs {
            let instr = instruction(r);
            let outputs: Vec<String> = match &r["output"] {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
                other => panic!("{file}: output {other}"),
            };
            for text in std::iter::once(r["prompt"].as_str().unwrap()).chain(outputs.iter().map(String::as_str)) {
                let ids = tok.encode(text).unwrap();
                assert!(!ids.contains(&unk), "{file}: unknown word in {text:?}");
                // Word-level decoding joins words with spaces: what is written decodes back.
                assert_eq!(
                    tok.decode(&ids, true).unwrap().split_whitespace().collect::<Vec<_>>(),
                    text.split_whitespace().collect::<Vec<_>>()
                );
            }
            match solve(&instr) {
                Some(answer) => assert_eq!(outputs, vec![answer], "{file}: {instr}"),
                None => {
                    let family = r["family"].as_str().unwrap();
                    let expected = match family {
                        "name-two" => 30,
                        "name-three" => 120,
                        "sentence" => 4,
                        "sentence-two" => 8,
                        "example" => 6,
                        f => panic!("unexpected family {f}"),
                    };
                    let distinct: BTreeSet<&String> = outputs.iter().collect();
                    let want = if file == "train.jsonl" { 1 } else { expected };
                    assert_eq!(distinct.len(), want, "{file}: {instr} has {} answers", distinct.len());
                }
            }
            instructions.insert(instr);
        }
        if file != "train.jsonl" {
            assert_eq!(instructions.len(), rs.len(), "{file}: evaluation instructions repeat");
        }
        by_split.push((file, instructions, rs));
    }
    let (train, valid, test, held) = (&by_split[0].1, &by_split[1].1, &by_split[2].1, &by_split[3].1);
    assert!(train.is_disjoint(valid) && train.is_disjoint(test) && valid.is_disjoint(test));
    assert!(held.is_disjoint(train) && held.is_disjoint(valid) && held.is_disjoint(test));
    // The held-out families never occur in training; every trained family does, and training
    // repeats multi-answer instructions with different answers (a multi-modal target).
    let families = |rs: &[Value]| rs.iter().map(|r| r["family"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
    let trained = families(&by_split[0].2);
    assert_eq!(trained.len(), Family::TRAINED.len());
    assert!(Family::HELD_OUT.iter().all(|f| !trained.contains(f.name())));
    assert_eq!(families(&by_split[3].2).len(), Family::HELD_OUT.len());
    let mut answers_of = std::collections::BTreeMap::<String, BTreeSet<String>>::new();
    for r in &by_split[0].2 {
        answers_of.entry(instruction(r)).or_default().insert(r["output"].as_str().unwrap().to_string());
    }
    assert!(answers_of.values().any(|a| a.len() >= 3), "no multi-answer instruction seen with several answers");

    let corpus = std::fs::read_to_string(tmp.path().join("corpus.txt")).unwrap();
    assert_eq!(corpus.lines().count(), 50);
    assert!(!tok.encode(&corpus).unwrap().contains(&unk));
}

#[test]
fn dataset_is_deterministic_under_the_seed() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synthetic::write_dataset(a.path(), &sizes(), 3).unwrap();
    synthetic::write_dataset(b.path(), &sizes(), 3).unwrap();
    synthetic::write_dataset(c.path(), &sizes(), 4).unwrap();
    let read = |d: &tempfile::TempDir| std::fs::read(d.path().join("train.jsonl")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
}

#[test]
fn splits_are_fixed_by_the_instruction_text_in_roughly_seven_one_two() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut seen = BTreeSet::new();
    let mut counts = [0usize; 3];
    for _ in 0..20_000 {
        let t = draw(Family::Sort, &mut rng);
        if seen.insert(t.instruction.clone()) {
            counts[match split_of(&t.instruction) {
                Split::Train => 0,
                Split::Valid => 1,
                Split::Test => 2,
            }] += 1;
        }
    }
    let n = counts.iter().sum::<usize>() as f64;
    let share: Vec<f64> = counts.iter().map(|&c| c as f64 / n).collect();
    assert!(
        (share[0] - 0.7).abs() < 0.03 && (share[1] - 0.1).abs() < 0.02 && (share[2] - 0.2).abs() < 0.03,
        "{share:?}"
    );
}
