//! Rouge-L equals Google's `rouge_score` (use_stemmer=True): NLTK's Porter stem of every
//! distinct word in the evaluation sets, and precision/recall/F-measure of 1,194
//! (prediction, references) pairs from the real sets plus adversarial cases, within 1e-6
//! (fixtures from scripts/make_rouge_fixtures.py).

mod common;

use minillm::eval::{porter, rouge_l, rouge_l_max, tokenize};

#[test]
fn porter_stems_equal_nltk_for_every_word_of_the_evaluation_sets() {
    let text = std::fs::read_to_string(common::fixtures().join("rouge/stems.tsv")).unwrap();
    let mut wrong = Vec::new();
    let mut n = 0;
    for line in text.lines() {
        let (word, want) = line.split_once('\t').unwrap();
        n += 1;
        let got = porter::stem(word);
        if got != want {
            wrong.push(format!("{word}: {got} (nltk: {want})"));
        }
    }
    assert!(n > 15_000);
    assert!(wrong.is_empty(), "{} of {n} stems differ: {:?}", wrong.len(), &wrong[..wrong.len().min(20)]);
}

#[test]
fn rouge_l_equals_rouge_score_on_every_pair() {
    let text = std::fs::read_to_string(common::fixtures().join("rouge/pairs.jsonl")).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let pred = v["prediction"].as_str().unwrap();
        let refs: Vec<&str> = v["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        let want_tokens: Vec<String> = serde_json::from_value(v["tokens"].clone()).unwrap();
        assert_eq!(tokenize(pred, true), want_tokens, "pair {i}: tokens of {pred:?}");
        for (r, s) in refs.iter().zip(v["scores"].as_array().unwrap()) {
            let got = rouge_l(pred, r);
            let want: Vec<f64> = serde_json::from_value(s.clone()).unwrap();
            for (g, w) in [got.precision, got.recall, got.fmeasure].iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "pair {i}: {g} vs {w} for {pred:?} / {r:?}");
            }
        }
        let best = rouge_l_max(pred, &refs);
        assert!((best - v["fmeasure"].as_f64().unwrap()).abs() < 1e-6, "pair {i}: max over references");
        n += 1;
    }
    assert!(n >= 1000);
}

#[test]
fn known_values() {
    // "the cat sat on the mat" vs "the cat on the mat": LCS 5, P = 5/5, R = 5/6.
    let s = rouge_l("the cat on the mat", "the cat sat on the mat");
    assert!((s.precision - 1.0).abs() < 1e-12 && (s.recall - 5.0 / 6.0).abs() < 1e-12);
    assert!((s.fmeasure - 10.0 / 11.0).abs() < 1e-12);
    assert_eq!(rouge_l("", "x").fmeasure, 0.0);
    let mean = minillm::train::validation::mean_rouge_l(
        &["the cat".to_string(), "dogs".to_string()],
        &[vec!["a b".to_string(), "The cats!".to_string()], vec!["cats".to_string()]],
    );
    assert!((mean - 50.0).abs() < 1e-9, "{mean}");
    assert_eq!(rouge_l_max("x", &[]), 0.0);
}
