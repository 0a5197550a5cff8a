//! Training: the optimizer and schedules, the shared loop, and the methods built on it.

pub mod data_order;
pub mod minillm;
pub mod optim;
pub mod supervised;
pub mod trainer;
