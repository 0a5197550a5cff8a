//! Analyses of the paper beyond Rouge-L: calibration (ECE from label-word probabilities) and
//! exposure bias (ExAccErr curves).

pub mod calibration;
pub mod exposure;
