#!/usr/bin/env python3
"""rouge_score's Rouge-L (use_stemmer=True, max over references) over the 1,194 pairs of
tests/fixtures/rouge/pairs.jsonl: the Python side of benches/rouge.rs (see BENCHMARKS.md)."""
import json
import os
import statistics
import time

from rouge_score import rouge_scorer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
pairs = [json.loads(l) for l in open(os.path.join(ROOT, "tests", "fixtures", "rouge", "pairs.jsonl"))]
scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def run():
    return sum(max(scorer.score(r, p["prediction"])["rougeL"].fmeasure for r in p["references"]) for p in pairs)


times = []
for _ in range(5):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
m = statistics.median(times)
print(f"rouge_score: {len(pairs)} pairs in {m * 1e3:.0f} ms (median of 5) = {len(pairs) / m:.0f} pairs/s")
