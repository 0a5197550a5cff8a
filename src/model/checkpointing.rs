//! Activation (gradient) checkpointing: a transformer block runs as one op that keeps only its
//! input alive; its backward pass recomputes the block's forward from that input and
//! backpropagates through it, so a training step holds one block's activations at a time
//! instead of every block's (the memory of a step drops by about the block count, for one
//! extra forward pass).
//!
//! candle's backward of an op returns gradients for the op's tensor inputs only, so the
//! gradients of the block's own parameters, found during that recomputation, are handed to
//! the trainer through [`ParamGrads`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};

/// A block whose forward can be recomputed from its input.
pub trait Recompute: Send + Sync {
    /// The block's output for input `x` (built with the autograd graph when `x` is tracked).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// The block's trainable parameters.
    fn params(&self) -> Vec<Tensor>;
}

/// A block given as a closure over what its forward needs, and its parameters.
pub fn block<F>(forward: F, params: Vec<Tensor>) -> Arc<dyn Recompute>
where
    F: Fn(&Tensor) -> anyhow::Result<Tensor> + Send + Sync + 'static,
{
    Arc::new(FnBlock { forward, params })
}

struct FnBlock<F> {
    forward: F,
    params: Vec<Tensor>,
}

impl<F: Fn(&Tensor) -> anyhow::Result<Tensor> + Send + Sync> Recompute for FnBlock<F> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (self.forward)(x).map_err(|e| candle_core::Error::msg(format!("{e:#}")))
    }

    fn params(&self) -> Vec<Tensor> {
        self.params.clone()
    }
}

/// Parameter gradients found by recomputations, summed by parameter until taken.
#[derive(Default)]
pub struct ParamGrads(Mutex<HashMap<TensorId, Tensor>>);

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

    /// The gradients summed since the last call, by parameter id (emptying the store).
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.0.lock().expect("checkpoint gradients lock"))
    }
}

/// `block(x)` keeping only `x` for the backward pass, on CPU f32 input; other inputs run the
/// block directly.
pub fn checkpointed(x: &Tensor, block: Arc<dyn Recompute>, grads: Arc<ParamGrads>) -> candle_core::Result<Tensor> {
    if !crate::ops::fusable(x) {
        return block.forward(x);
    }
    x.contiguous()?.apply_op1(Checkpointed { block, grads })
}

struct Checkpointed {
    block: Arc<dyn Recompute>,
    grads: Arc<ParamGrads>,
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
        let y = self.block.forward(&x)?.contiguous()?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.block.forward(x.as_tensor())?;
        // d/dθ Σ y ⊙ g is the vector–Jacobian product the outer backward pass asks for.
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        for p in self.block.params() {
            if let Some(g) = store.get(&p) {
                self.grads.add(p.id(), g.detach())?;
            }
        }
        Ok(store.get(x.as_tensor()).map(Tensor::detach))
    }
}
