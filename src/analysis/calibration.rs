//! Calibration (paper §3.3): zero-shot classification from the probabilities of label words,
//! scored as continuations of an instruction prompt, then expected calibration error (ECE,
//! equal-width confidence bins) and accuracy.
//!
//! The paper's SST-2 and BoolQ prompts are figures not available as text; the presets here are
//! our own instructions in the same prompt template, named as such.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::data::jsonl::read_jsonl;
use crate::model::Model;
use crate::score::{score, ScoreRequest};
use crate::tokenizer::format_prompt;

/// An instruction/input template with `{field}` placeholders and the label words.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyTemplate {
    /// Instruction text.
    pub instruction: String,
    /// Input text with `{field}` placeholders filled from each record.
    pub input: String,
    /// Label words; label `i` is `label_words[i]`.
    pub label_words: Vec<String>,
}

impl ClassifyTemplate {
    /// `sst2` (`text`, labels negative/positive) or `boolq` (`passage`, `question`,
    /// labels no/yes).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "sst2" => Self {
                instruction: "Classify the sentiment of the following sentence as positive or negative.".into(),
                input: "{text}".into(),
                label_words: vec!["negative".into(), "positive".into()],
            },
            "boolq" => Self {
                instruction: "Read the passage and answer the question with yes or no.".into(),
                input: "{passage}\nQuestion: {question}?".into(),
                label_words: vec!["no".into(), "yes".into()],
            },
            other => bail!("unknown classification preset `{other}` (sst2, boolq)"),
        })
    }

    /// A custom template: `instruction`, `input` with `{field}` placeholders, and the label
    /// words (label `i` is word `i`; at least two).
    pub fn custom(instruction: &str, input: &str, label_words: &[String]) -> Result<Self> {
        let label_words: Vec<String> =
            label_words.iter().map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).collect();
        if label_words.len() < 2 {
            bail!("a classification needs at least two label words, got {}", label_words.len());
        }
        Ok(Self { instruction: instruction.to_string(), input: input.to_string(), label_words })
    }

    fn fill(&self, record: &Value) -> Result<String> {
        let mut out = String::new();
        let mut rest = self.input.as_str();
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').map(|e| start + e).context("unclosed `{` in the input template")?;
            let key = &rest[start + 1..end];
            let value = record.get(key).and_then(Value::as_str).with_context(|| format!("no string field `{key}`"))?;
            out.push_str(&rest[..start]);
            out.push_str(value);
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        Ok(format_prompt(&self.instruction, &out))
    }

    fn label(&self, record: &Value) -> Result<usize> {
        let n = self.label_words.len();
        let idx = match record.get("label") {
            Some(Value::Bool(b)) => *b as usize,
            Some(Value::Number(x)) => x.as_u64().context("`label` must be a non-negative integer")? as usize,
            Some(Value::String(s)) => self
                .label_words
                .iter()
                .position(|w| w == s)
                .with_context(|| format!("label `{s}` is not a label word"))?,
            _ => bail!("expected a `label` (index, boolean or label word)"),
        };
        if idx >= n {
            bail!("label {idx} is out of range for {n} label words");
        }
        Ok(idx)
    }
}

/// One example to classify.
#[derive(Clone, Debug)]
pub struct ClassifyExample {
    /// The filled prompt.
    pub prompt: String,
    /// Index of the true label word.
    pub label: usize,
}

/// Reads a classification jsonl with the template's fields and a `label`.
pub fn load_classification(path: &Path, template: &ClassifyTemplate) -> Result<Vec<ClassifyExample>> {
    let mut out = Vec::new();
    for (line, parsed) in read_jsonl(path)? {
        let at = || format!("{}:{line}", path.display());
        let v = parsed.with_context(at)?;
        let prompt = template.fill(&v).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let label = template.label(&v).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        out.push(ClassifyExample { prompt, label });
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// Probability of each label word, normalised over the label words: each word is scored as
/// the continuation of the prompt (all its tokens, no EOS).
pub fn label_probabilities(
    model: &Model,
    template: &ClassifyTemplate,
    examples: &[ClassifyExample],
) -> Result<Vec<Vec<f64>>> {
    let tok = model.tokenizer()?;
    let mut reqs = Vec::new();
    for e in examples {
        let prompt = tok.encode(&e.prompt)?;
        for w in &template.label_words {
            let full = tok.encode(&format!("{}{w}", e.prompt))?;
            let from = prompt.len().min(full.len().saturating_sub(1)).max(1);
            reqs.push(ScoreRequest { ids: full, score_from: from });
        }
    }
    let scores = score(model.lm.as_ref(), &reqs, 8192)?;
    let k = template.label_words.len();
    Ok(scores
        .chunks(k)
        .map(|c| {
            let lp: Vec<f64> = c.iter().map(|s| s.total).collect();
            let m = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = lp.iter().map(|x| (x - m).exp()).sum();
            lp.iter().map(|x| (x - m).exp() / z).collect()
        })
        .collect())
}

/// Expected calibration error over `bins` equal-width confidence bins:
/// `Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)|`.
pub fn ece(confidences: &[f64], correct: &[bool], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut count = vec![0usize; bins];
    let (mut conf, mut acc) = (vec![0f64; bins], vec![0f64; bins]);
    for (&c, &ok) in confidences.iter().zip(correct) {
        let b = ((c * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        conf[b] += c;
        acc[b] += ok as u8 as f64;
    }
    let n = confidences.len().max(1) as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (acc[b] - conf[b]).abs() / n).sum()
}

/// ECE and accuracy of a model on a classification file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Expected calibration error (fraction).
    pub ece: f64,
    /// Accuracy (fraction).
    pub accuracy: f64,
    /// Examples.
    pub examples: usize,
}

/// Classifies every example and measures ECE and accuracy.
pub fn calibration(
    model: &Model,
    template: &ClassifyTemplate,
    examples: &[ClassifyExample],
    bins: usize,
) -> Result<Calibration> {
    if bins == 0 {
        bail!("the number of confidence bins must be at least 1");
    }
    let probs = label_probabilities(model, template, examples)?;
    let (mut confs, mut correct) = (Vec::new(), Vec::new());
    for (p, e) in probs.iter().zip(examples) {
        let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
        confs.push(p[best]);
        correct.push(best == e.label);
    }
    let accuracy = correct.iter().filter(|&&c| c).count() as f64 / correct.len().max(1) as f64;
    Ok(Calibration { ece: ece(&confs, &correct, bins), accuracy, examples: examples.len() })
}
