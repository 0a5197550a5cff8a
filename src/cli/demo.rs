//! `minillm demo`: a walk through the model stack on two small models built in memory.
//!
//! Until the distillation demo lands, this shows what the foundation does end to end, with
//! nothing to download: a Llama-style teacher and a GPT-2 student (random weights, byte-level
//! vocabulary) decode in lockstep with teacher-mixed sampling; the rollouts are re-scored
//! with the student to check the sampler's log q; the student is saved in Hugging Face layout,
//! reloaded, and compared logit for logit.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::model::{load_model, save_model, AttentionMask, Model};
use crate::sample::{generate_mixed, row_rngs, MixedSampling};
use crate::score::{score, ScoreRequest};
use crate::tokenizer::format_prompt;

/// Byte ids 0–255, then EOS.
const EOS: u32 = 256;
const VOCAB: usize = 257;

const INSTRUCTIONS: &[&str] = &[
    "Name three animals that live in the sea.",
    "Reverse the list 3, 1, 4, 1, 5.",
    "Write a sentence about rivers using the word 'stone'.",
    "What is seven plus five?",
    "Sort the words pear, apple, fig.",
    "Give two synonyms of 'happy'.",
    "Copy the sequence a b c d.",
    "Describe the colour of the sky at noon.",
];

/// Runs the walk-through and prints what it measured.
pub fn demo(seed: u64) -> Result<()> {
    let dev = Device::Cpu;
    let teacher = Model::random(
        json!({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 344,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": false,
               "eos_token_id": EOS, "initializer_range": 0.2}),
        seed,
        &dev,
        DType::F32,
    )?;
    let student = Model::random(
        json!({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 512, "n_embd": 64, "n_layer": 2,
               "n_head": 4, "eos_token_id": EOS, "bos_token_id": EOS, "initializer_range": 0.2}),
        seed + 1,
        &dev,
        DType::F32,
    )?;
    println!(
        "teacher: llama, {} parameters; student: gpt2, {} parameters (random weights, byte vocabulary)",
        teacher.lm.params().num_elements(),
        student.lm.params().num_elements()
    );

    let prompts: Vec<Vec<u32>> =
        INSTRUCTIONS.iter().map(|i| format_prompt(i, "").bytes().map(u32::from).collect()).collect();
    let alpha = 0.2;
    let cfg = MixedSampling {
        alpha,
        max_new_tokens: 64,
        max_length: None,
        keep_teacher_hidden: false,
        record_forward_kl: false,
    };
    let mut rngs = row_rngs(seed, 0..prompts.len() as u64);
    let t0 = Instant::now();
    let rollout = generate_mixed(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, &[EOS], EOS, &cfg, &mut rngs)?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens: usize = rollout.generation.responses.iter().map(Vec::len).sum();
    println!(
        "teacher-mixed sampling (α = {alpha}): {} rollouts, {tokens} tokens in {secs:.2} s ({:.0} tokens/s, both models)",
        prompts.len(),
        tokens as f64 / secs
    );
    let (mut k3, mut n) = (0f64, 0usize);
    for (lq, lp) in rollout.logq.iter().zip(&rollout.logp) {
        for (&q, &p) in lq.iter().zip(lp) {
            let d = (p - q) as f64;
            k3 += d.exp() - 1.0 - d;
            n += 1;
        }
    }
    println!("  reverse-KL estimate (k3, per token): {:.4}", k3 / n.max(1) as f64);
    let first = &rollout.generation.responses[0];
    println!(
        "  first rollout: {:?}",
        String::from_utf8_lossy(&first.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect::<Vec<_>>())
    );

    let requests: Vec<ScoreRequest> = rollout
        .generation
        .prompts
        .iter()
        .zip(&rollout.generation.responses)
        .map(|(p, r)| ScoreRequest { ids: [p.clone(), r.clone()].concat(), score_from: p.len() })
        .collect();
    let rescored = score(student.lm.as_ref(), &requests, 8192)?;
    let mut worst = 0f32;
    for (s, lq) in rescored.iter().zip(&rollout.logq) {
        for (a, b) in s.logprobs.iter().zip(lq) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("  student re-scoring vs sampling-time log q: max |Δ| = {worst:.2e}");
    ensure!(worst < 1e-3, "re-scored log-probabilities disagree with the sampler's");

    let dir = Path::new("runs/demo/student");
    save_model(&student, dir, DType::F32)?;
    let reloaded = load_model(dir, &dev, DType::F32)?;
    let ids = Tensor::new(&prompts[0][..], &dev)?.unsqueeze(0)?;
    let mask = AttentionMask::full(1, prompts[0].len());
    let a = student.lm.forward(&ids, &mask, None)?;
    let b = reloaded.lm.forward(&ids, &mask, None)?;
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("saved the student to {} and reloaded it: max |Δlogit| = {diff:e}", dir.display());
    ensure!(diff == 0.0, "the reloaded student differs");
    println!("The distillation demo (teacher training, SFT/KD/SeqKD/MiniLLM, evaluation) builds on this.");
    Ok(())
}
