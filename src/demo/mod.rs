//! `minillm demo`: the paper's main experiment in miniature — a synthetic world with checkable
//! facts ([`world`]) and its data ([`tasks`]), the experiment's design ([`plan`]), the
//! pipeline per seed ([`stages`]), what is measured ([`measure`]), the results across repeats
//! ([`summary`]), the whole run ([`pipeline`]), and the Figure 2 toy ([`toy`]).

pub mod measure;
pub mod pipeline;
pub mod plan;
pub mod stages;
pub mod summary;
pub mod tasks;
pub mod toy;
pub mod world;

pub use pipeline::{run, DemoOptions};
