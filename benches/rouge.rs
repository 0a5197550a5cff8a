//! Rouge-L over the 1,194 (prediction, references) pairs of tests/fixtures/rouge/pairs.jsonl,
//! the same work as `scripts/bench_rouge.py` does with `rouge_score` (see BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minillm::eval::rouge_l_max;

fn rouge(c: &mut Criterion) {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rouge/pairs.jsonl")).unwrap();
    let pairs: Vec<(String, Vec<String>)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let refs = v["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
            (v["prediction"].as_str().unwrap().to_string(), refs)
        })
        .collect();
    let mut group = c.benchmark_group("rouge");
    group.throughput(Throughput::Elements(pairs.len() as u64));
    group.bench_function("rougeL with stemming, 1194 fixture pairs", |b| {
        b.iter(|| {
            pairs.iter().map(|(p, r)| rouge_l_max(p, &r.iter().map(String::as_str).collect::<Vec<_>>())).sum::<f64>()
        })
    });
    group.finish();
}

criterion_group!(benches, rouge);
criterion_main!(benches);
