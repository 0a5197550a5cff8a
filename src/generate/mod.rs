//! Generation: the batched KV-cache decoding loop, plain sampling with `transformers`' logits
//! processors, MiniLLM's teacher-mixed sampling, and [`Sampler::decode_in_chunks`], the one
//! way every part of the program decodes a list of prompts.

pub mod chunks;
pub mod decode;
pub mod mixed;
pub mod processors;

pub use chunks::{consecutive_rows, Sample, Sampler};
pub use decode::{generate, row_rngs, Generation, SamplingConfig};
pub use mixed::{generate_mixed, mix_log_prob, MixedRollout, MixedSampling};
pub use processors::{
    argmax, banned_ngram_tokens, log_softmax_into, process_logits, sample_from_logits, sample_from_weights,
    top_k_filter, top_p_filter,
};
