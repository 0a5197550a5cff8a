//! Activation (gradient) checkpointing: a transformer block runs as one op that keeps only its
//! input alive; its backward pass recomputes the block's forward from that input and
//! backpropagates through it, so a training step holds one block's activations at a time
//! instead of every block's (the memory of a step drops by about the block count, for one
//! extra forward pass).
//!
//! candle's backward of an op returns gradients for the op's tensor inputs only, so the
//! gradients of the block's own parameters, found during that recomputation, are set aside in
//! the model's [`Checkpointing`] until the trainer takes them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};

/// A model's checkpointing switch and the parameter gradients its recomputations found (one
/// per model, shared by its blocks).
#[derive(Default)]
pub struct Checkpointing {
    on: AtomicBool,
    grads: Arc<ParamGrads>,
}

impl Checkpointing {
    /// Turns checkpointing on or off.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether a forward pass checkpoints its blocks: training forwards (no KV cache) while on.
    pub fn active(&self, cached: bool) -> bool {
        !cached && self.on.load(Ordering::Relaxed)
    }

    /// `forward(x)` as one checkpointed block whose trainable tensors are `params`, on CPU f32
    /// input (other inputs run `forward` directly).
    pub fn block<F>(&self, x: &Tensor, forward: F, params: Vec<Tensor>) -> anyhow::Result<Tensor>
    where
        F: Fn(&Tensor) -> anyhow::Result<Tensor> + Send + Sync + 'static,
    {
        if !crate::ops::fusable(x) {
            return forward(x);
        }
        let op = Checkpointed { forward: Arc::new(forward), params, grads: self.grads.clone() };
        Ok(x.contiguous()?.apply_op1(op)?)
    }

    /// The parameter gradients summed since the last call, by parameter id (emptying the store).
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.grads.0.lock().expect("checkpoint gradients lock"))
    }
}

/// Parameter gradients found by recomputations, summed by parameter until taken.
#[derive(Default)]
struct ParamGrads(Mutex<HashMap<TensorId, Tensor>>);

impl ParamGrads {
    fn add(&self, id: TensorId, g: Tensor) -> candle_core::Result<()> {
        let mut map = self.0.lock().expect("checkpoint gradients lock");
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }
}

type BlockForward = dyn Fn(&Tensor) -> anyhow::Result<Tensor> + Send + Sync;

struct Checkpointed {
    forward: Arc<BlockForward>,
    params: Vec<Tensor>,
    grads: Arc<ParamGrads>,
}

impl Checkpointed {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (self.forward)(x).map_err(|e| candle_core::Error::msg(format!("{e:#}")))
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(
            crate::ops::contiguous_f32(s, l, "checkpointed-block")?,
            l.shape(),
            &candle_core::Device::Cpu,
        )?;
        // The graph this builds is dropped with `y`: only the output survives the op.
        let y = self.forward(&x)?.contiguous()?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.forward(x.as_tensor())?;
        // d/dθ Σ y ⊙ g is the vector–Jacobian product the outer backward pass asks for.
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = store.get(p) {
                self.grads.add(p.id(), g.detach())?;
            }
        }
        Ok(store.get(x.as_tensor()).map(Tensor::detach))
    }
}
