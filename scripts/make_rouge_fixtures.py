#!/usr/bin/env python3
"""Rouge-L references from PyPI `rouge-score` (with its NLTK Porter stemmer).

    python scripts/make_rouge_fixtures.py   # writes tests/fixtures/rouge/{stems.tsv,pairs.jsonl}

stems.tsv: every distinct token longer than 3 characters in the evaluation sets, with the
stem `rouge_score` gives it. pairs.jsonl: (prediction, references) pairs from the real
evaluation sets (other examples' outputs, perturbed copies of the reference) and adversarial
cases, with rouge_score's precision/recall/F-measure per reference.
"""
import json
import os
import random

from rouge_score import rouge_scorer, tokenize
from rouge_score.tokenizers import DefaultTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "..", "shared", "data", "minillm_eval")
OUT = os.path.join(ROOT, "tests", "fixtures", "rouge")
SETS = ["dolly/valid.jsonl", "self-inst/valid.jsonl", "vicuna/valid.jsonl", "sinst/11_/valid.jsonl", "uinst/0_2/valid.jsonl"]


def refs(row):
    o = row["output"]
    return o if isinstance(o, list) else [o]


def perturb(text, rng):
    words = text.split()
    kind = rng.randrange(6)
    if kind == 0 and words:  # drop words
        return " ".join(w for w in words if rng.random() > 0.3)
    if kind == 1 and words:  # shuffle a window
        i = rng.randrange(len(words))
        win = words[i:i + 8]
        rng.shuffle(win)
        return " ".join(words[:i] + win + words[i + 8:])
    if kind == 2:  # case and punctuation
        return "".join(c.upper() if rng.random() < 0.2 else c for c in text).replace(" ", ", ", 3) + "!!"
    if kind == 3 and words:  # inflect: add suffixes the stemmer removes
        return " ".join(w + rng.choice(["s", "ing", "ed", "ly", "ness", "ational"]) if rng.random() < 0.3 else w for w in words)
    if kind == 4:  # truncate
        return text[: max(1, len(text) // 2)]
    return text + " " + text  # repeat


ADVERSARIAL = [
    ("", "the cat sat"), ("the cat sat", ""), ("", ""), ("!!! ??? ...", "... !!!"), ("---", "a-b-c"),
    ("state-of-the-art results", "state of the art result"), ("e-mail", "email"),
    ("naïve café résumé", "naive cafe resume"), ("İstanbul ÇAĞ Ω Kelvin", "istanbul cag kelvin"),
    ("日本語のテキスト", "日本語"), ("emoji 🙂 test 🚀", "emoji test"), ("ﬁne ligature", "fine ligature"),
    ("123 4567 89", "123 456 789"), ("3.14159 is pi", "pi is 3 14159"), ("2023-11-22", "2023 11 22"),
    ("a a a a a a", "a"), ("the the the cat", "the cat the"), ("running runs ran runner", "run running"),
    ("generalization generalizations generalize", "general generalization"),
    ("relational conditional rational", "relate condition ration"), ("happiness happy happily", "happy"),
    ("skies dying lying tying news innings", "sky die lie tie news inning"),
    ("caresses ponies ties caress cats", "caress poni ti caress cat"),
    ("feed agreed plastered bled motoring sing", "feed agre plaster bled motor sing"),
    ("conflated troubled sized hopping tanned falling hissing fizzed failing filing", "x"),
    ("happy sky syllogism electrical hopefulness goodness formalize", "y"),
    ("revival allowance inference airliner gyroscopic adjustable defensible", "z"),
    ("irritant replacement adjustment dependent adoption homologou communism activate", "w"),
    ("angulariti homologous effective bowdlerize probate rate cease controll roll", "v"),
    ("\t tabs\nand\r\nnewlines  ", "tabs and newlines"), ("UPPER lower MiXeD", "upper LOWER mixed"),
    ("word " * 600, "word " * 3 + "other " * 300), ("x" * 200, "x" * 200),
    ("analogous analogously analogy apology", "analog apolog"), ("yelling yelled yell", "yell"),
    ("ies ied bies bied ties tied", "ie i"), ("anomalli fulli logi bli", "x"),
]


def main():
    rng = random.Random(0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    tok = DefaultTokenizer(use_stemmer=False)
    stemmer = DefaultTokenizer(use_stemmer=True)._stemmer
    rows = []
    words = set()
    for s in SETS:
        with open(os.path.join(DATA, s)) as f:
            data = [json.loads(l) for l in f if l.strip()]
        for r in data:
            for text in [r.get("instruction", ""), r.get("input", "")] + refs(r):
                words.update(t for t in tok.tokenize(text) if len(t) > 3)
        picks = rng.sample(range(len(data)), min(len(data), 120))
        for i in picks:
            reference = refs(data[i])
            other = refs(data[(i + 1) % len(data)])[0]
            rows.append((other, reference))
            rows.append((perturb(reference[0], rng), reference))
    for word in ["generalizations", "hopefulness", "skies", "yelling"]:
        words.add(word)
    for a, b in ADVERSARIAL:
        rows.append((a, [b]))
        rows.append((b, [a]))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "stems.tsv"), "w") as f:
        for w in sorted(words):
            f.write(f"{w}\t{stemmer.stem(w)}\n")
    with open(os.path.join(OUT, "pairs.jsonl"), "w") as f:
        for pred, references in rows:
            scores = [scorer.score(r, pred)["rougeL"] for r in references]
            f.write(json.dumps({
                "prediction": pred, "references": references,
                "scores": [[s.precision, s.recall, s.fmeasure] for s in scores],
                "fmeasure": max(s.fmeasure for s in scores),
                "tokens": tokenize.tokenize(pred, stemmer),
            }, ensure_ascii=False) + "\n")
    print(f"{len(words)} stems, {len(rows)} pairs")


if __name__ == "__main__":
    main()
