//! Training: the shared loop ([`trainer`]), its run directory, the optimizer and schedules,
//! the supervised objective and validation every method uses, and the methods' tasks —
//! [`pretrain`] (language modelling on a corpus), [`supervised`] (SFT, KD, SeqKD's training phase,
//! GKD with [`gkd`]'s response schedule, DistiLLM with [`distillm`]'s adaptive off-policy
//! schedule; both in terms of [`responses`]), [`seqkd`] (teacher generations) and [`minillm`]
//! (on-policy reverse-KL distillation).

pub mod data_order;
pub mod distillm;
pub mod gkd;
pub mod minillm;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod responses;
pub mod run_dir;
pub mod seqkd;
pub mod supervised;
pub mod trainer;
pub mod validation;
