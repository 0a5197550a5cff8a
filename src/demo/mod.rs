//! `minillm demo`: the paper's main experiment in miniature — a synthetic instruction task
//! ([`synthetic`]), the pipeline that trains, distils and evaluates on it ([`pipeline`]), and
//! the Figure 2 toy ([`toy`]).

pub mod pipeline;
pub mod synthetic;
pub mod toy;

pub use pipeline::{run, DemoOptions};
