//! Training: the optimizer and schedules, the shared loop, and the methods built on it.

pub mod optim;
