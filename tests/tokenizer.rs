//! The GPT-2 BPE built from `vocab.json`/`merges.txt` and the prompt template reproduce
//! MiniLLM's own processed data exactly (its token binaries and its prompt strings).

mod common;

use std::path::Path;

use common::shared_data;
use minillm::tokenizer::{encode_example, format_prompt, Tokenizer};

fn gpt2() -> Tokenizer {
    let d = shared_data().join("gpt2_tokenizer");
    Tokenizer::from_gpt2_files(&d.join("encoder.json"), &d.join("vocab.bpe")).unwrap()
}

/// Samples of MiniLLM's Megatron-style indexed dataset (`.idx` + `.bin`, uint16 tokens).
fn read_indexed(prefix: &Path) -> Vec<Vec<u32>> {
    let idx = std::fs::read(prefix.with_extension("idx")).unwrap();
    assert_eq!(&idx[..9], b"MMIDIDX\x00\x00");
    let u64_at = |o: usize| u64::from_le_bytes(idx[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(idx[17], 8, "uint16 tokens");
    let n = u64_at(18);
    let sizes_at = 34;
    let ptrs_at = sizes_at + 4 * n;
    let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
    (0..n)
        .map(|i| {
            let size = i32::from_le_bytes(idx[sizes_at + 4 * i..sizes_at + 4 * i + 4].try_into().unwrap()) as usize;
            let ptr = u64_at(ptrs_at + 8 * i);
            (0..size).map(|k| u16::from_le_bytes([bin[ptr + 2 * k], bin[ptr + 2 * k + 1]]) as u32).collect()
        })
        .collect()
}

#[test]
fn gpt2_bpe_and_template_reproduce_minillm_training_tokens() {
    let tok = gpt2();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50256));
    let data = shared_data().join("minillm_dolly_train");
    let samples = read_indexed(&data.join("gpt2_tokenized_full/train_0"));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(data.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 11_435);
    assert_eq!(lines.len(), samples.len());
    for (i, (s, l)) in samples.iter().zip(&lines).enumerate() {
        let split = s.iter().position(|&t| t == 65535).expect("prompt/response separator");
        let prompt = format_prompt(l["instruction"].as_str().unwrap(), l["input"].as_str().unwrap());
        let ex = encode_example(&tok, &prompt, l["output"].as_str().unwrap(), 50256).unwrap();
        assert_eq!(ex.prompt, s[..split], "sample {i}: prompt tokens");
        assert_eq!(ex.response, s[split + 1..], "sample {i}: response tokens");
    }
}

#[test]
fn template_equals_the_prompts_of_minillm_eval_sets() {
    for set in ["dolly/valid.jsonl", "dolly/dev.jsonl", "self-inst/valid.jsonl", "sinst/11_/valid.jsonl"] {
        let text = std::fs::read_to_string(shared_data().join("minillm_eval").join(set)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let got = format_prompt(v["instruction"].as_str().unwrap(), v["input"].as_str().unwrap_or(""));
            assert_eq!(got, v["prompt"].as_str().unwrap(), "{set} line {}", i + 1);
        }
    }
}

#[test]
fn decoding_round_trips_text() {
    let tok = gpt2();
    for s in ["Hello, world!", "  leading spaces\nand\ttabs", "naïve café – ünïcödé 🙂", "<|endoftext|>"] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![50256]);
}

#[test]
fn tokenizer_json_round_trips_through_save() {
    let tok = gpt2();
    let dir = tempfile::tempdir().unwrap();
    tok.save(&dir.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    let text = "Below is an instruction that describes a task. 1234 tokens!";
    assert_eq!(tok.encode(text).unwrap(), back.encode(text).unwrap());
}

#[test]
fn missing_tokenizer_files_are_reported() {
    let e = Tokenizer::from_gpt2_files(Path::new("/nonexistent/vocab.json"), Path::new("/nonexistent/merges.txt"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/vocab.json"), "{e}");
}
