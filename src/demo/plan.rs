//! The demo's experiment design, fixed before any test result was seen (RESULTS.md, "Design"):
//! the world's size, the two model sizes, every stage's step budget, the shared learning-rate
//! grid and the rates the sweep chose.

use super::tasks::Sizes;

/// A GPT-2-layout model: layers, width, heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
}

/// Sizes and budgets of one flavour of the demo (full or `--quick`).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// World and data sizes.
    pub sizes: Sizes,
    /// The teacher.
    pub teacher: Arch,
    /// The student (all methods).
    pub student: Arch,
    /// Pre-training steps of the teacher and of the student.
    pub pretrain_steps: (usize, usize),
    /// Instruction-tuning steps of the teacher.
    pub teacher_steps: usize,
    /// Steps of every student method (SFT, KD, SeqKD, and MiniLLM's phase 2).
    pub student_steps: usize,
    /// Sequences per step of the supervised stages.
    pub batch_size: usize,
    /// Rollouts per MiniLLM collection.
    pub num_rollouts: usize,
    /// Rollouts per MiniLLM update.
    pub rollout_minibatch: usize,
    /// Passes over each rollout buffer.
    pub inner_epochs: usize,
    /// Validations per run (checkpoint selection points).
    pub validations: usize,
    /// Test and held-out examples evaluated (at most).
    pub eval_examples: usize,
    /// Exposure bias: prompts, sampled prefixes per prompt, generation length.
    pub exposure: (usize, usize, usize),
}

/// Longest prompt (tokens) and prompt + response.
pub const MAX_PROMPT_LEN: usize = 32;
/// Prompt + response limit (the longest answer has ~70 words).
pub const MAX_LEN: usize = 112;
/// Positions of both models.
pub const POSITIONS: usize = 128;
/// Pre-training chunk length.
pub const CHUNK: usize = 128;
/// The evaluation seeds of the paper's protocol.
pub const EVAL_SEEDS: [u64; 5] = [10, 20, 30, 40, 50];

/// The learning-rate grid every student method is swept over (`demo --sweep`).
pub const LR_GRID: [f64; 7] = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2];

/// The rates `demo --sweep` chose per method (highest validation Rouge-L on seed 0, recorded
/// on 2026-11-30; RESULTS.md, "Sweep" and "The on-policy family").
pub const CHOSEN_LR: [(&str, f64); 7] =
    [("sft", 1e-2), ("kd", 1e-2), ("seqkd", 1e-2), ("minillm", 3e-3), ("gkd", 1e-2), ("opd", 3e-5), ("distillm", 1e-2)];

/// Learning rates of the stages that are not compared (pre-training, the teacher).
pub const PRETRAIN_LR: f64 = 2e-3;
/// Learning rate of the teacher's instruction tuning.
pub const TEACHER_LR: f64 = 1e-3;

impl Plan {
    /// The full demo, or the CI-sized one.
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                sizes: Sizes { animals: 16, train: 2000, corpus_docs: 600, corpus_valid_docs: 16 },
                teacher: Arch { layers: 2, width: 128, heads: 4 },
                student: Arch { layers: 1, width: 32, heads: 4 },
                pretrain_steps: (300, 150),
                teacher_steps: 60,
                student_steps: 40,
                batch_size: 16,
                num_rollouts: 32,
                rollout_minibatch: 16,
                inner_epochs: 1,
                validations: 2,
                eval_examples: 24,
                exposure: (6, 2, 24),
            }
        } else {
            Plan {
                sizes: Sizes { animals: 48, train: 8000, corpus_docs: 4000, corpus_valid_docs: 64 },
                teacher: Arch { layers: 4, width: 192, heads: 4 },
                student: Arch { layers: 2, width: 48, heads: 4 },
                pretrain_steps: (900, 1200),
                teacher_steps: 150,
                student_steps: 600,
                batch_size: 32,
                num_rollouts: 128,
                rollout_minibatch: 16,
                inner_epochs: 2,
                validations: 8,
                eval_examples: 1000,
                exposure: (32, 4, 80),
            }
        }
    }

    /// The chosen learning rate of a student method.
    pub fn lr(method: &str) -> f64 {
        CHOSEN_LR.iter().find(|(m, _)| *m == method).map_or(1e-3, |(_, lr)| *lr)
    }
}
