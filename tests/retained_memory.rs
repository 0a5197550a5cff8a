//! What a forward pass keeps alive for the backward pass, measured with a counting allocator
//! (this file holds one test, so no other test allocates meanwhile): a frozen model's keeps
//! nothing but its output; a trainable model's keeps every block's activations, and with
//! activation checkpointing only each block's input.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use candle_core::{DType, Device, Tensor};
use minillm::model::{load_model, load_model_as, AttentionMask, Model, Weights};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes still allocated after a forward pass whose hidden states are kept (as a teacher's
/// are, for a loss computed later).
fn retained_by_forward(m: &Model, input: &Tensor) -> (isize, Tensor) {
    let (b, t) = input.dims2().unwrap();
    let before = LIVE.load(Ordering::SeqCst);
    let h = m.lm.forward_hidden(input, &AttentionMask::full(b, t), None).unwrap();
    (LIVE.load(Ordering::SeqCst) - before, h)
}

#[test]
fn forwards_keep_only_what_their_backward_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(tmp.path(), "gpt2", 128, 4, 1);
    let ids: Vec<u32> = (0..8 * 64).map(|i| (i % 383 + 1) as u32).collect();
    let input = Tensor::from_vec(ids, (8, 64), &Device::Cpu).unwrap();
    let output_bytes = (8 * 64 * 128 * 4) as isize;
    let frozen = load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).unwrap();
    let trainable = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    // One pass first: thread pools and caches allocated once are not what is measured.
    drop(retained_by_forward(&frozen, &input));
    // Repeated forwards: what a frozen one retains does not grow with the number of passes.
    let mut kept = Vec::new();
    for _ in 0..3 {
        let (bytes, h) = retained_by_forward(&frozen, &input);
        assert!(bytes <= 2 * output_bytes, "a frozen forward retained {bytes} bytes for a {output_bytes}-byte output");
        kept.push(h);
    }
    // The trainable model's graph keeps every layer's activations (the contrast this guards).
    let (plain, h) = retained_by_forward(&trainable, &input);
    drop(h);
    assert!(plain > 10 * output_bytes, "the trainable forward retained only {plain} bytes");
    // Checkpointed: the 4 blocks' inputs and the final norm's activations.
    trainable.lm.set_grad_checkpointing(true).unwrap();
    let (ckpt, _h) = retained_by_forward(&trainable, &input);
    assert!(ckpt * 3 < plain, "checkpointing retained {ckpt} bytes, the plain forward {plain}");
}
