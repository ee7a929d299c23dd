//! Trainable parameters: a flat, named set of f32 buffers with their gradients.
//!
//! Model code registers each weight once and keeps the returned [`ParamId`]; forward passes read
//! `set[id].value`, backward passes add into `set[id].grad` (use [`ParamSet::many_mut`] to borrow a
//! weight and its bias together). The optimizer, clipping and accumulation walk the whole set.
//! Frozen parameters keep an empty `grad`, so a frozen 135M-parameter LLM costs no gradient memory.

use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Handle to a parameter in the [`ParamSet`] that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(usize);

#[derive(Clone, Debug)]
pub struct Param {
    /// Unique within its set; the key for optimizer state in checkpoints.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    /// Same length as `value` when trainable, empty when frozen.
    pub grad: Vec<f32>,
    pub trainable: bool,
    /// Whether AdamW's weight decay applies. Default: matrices (rank ≥ 2) yes; biases and norm
    /// gains no, as in GPT-2/LLaMA training recipes.
    pub decay: bool,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.value.len()
    }

    /// The value as a tensor (a copy), for the tensor-level forward ops.
    pub fn tensor(&self) -> Tensor {
        Tensor::from_vec(self.value.clone(), &self.shape).expect("shape matches value by construction")
    }

    /// The value, and the gradient when trainable: what a backward pass takes (`None` skips the
    /// weight-gradient work for a frozen parameter).
    pub fn value_and_grad(&mut self) -> (&[f32], Option<&mut [f32]>) {
        (&self.value, self.trainable.then_some(self.grad.as_mut_slice()))
    }
}

#[derive(Clone, Debug, Default)]
pub struct ParamSet {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a parameter; fails on a duplicate name or a value that does not fill `shape`.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        value: Vec<f32>,
        trainable: bool,
    ) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            bail!("parameter {name:?} is registered twice");
        }
        if value.len() != shape.iter().product::<usize>() {
            bail!("parameter {name:?}: {} values for shape {shape:?}", value.len());
        }
        let grad = if trainable { vec![0.0; value.len()] } else { Vec::new() };
        let id = ParamId(self.params.len());
        self.by_name.insert(name.clone(), id.0);
        self.params.push(Param { name, shape: shape.to_vec(), value, grad, trainable, decay: shape.len() >= 2 });
        Ok(id)
    }

    /// Registers a tensor (any dtype; stored as f32).
    pub fn register(&mut self, name: impl Into<String>, t: &Tensor, trainable: bool) -> Result<ParamId> {
        let shape = t.shape().to_vec();
        self.add(name, &shape, t.to_dtype(DType::F32).into_f32s()?, trainable)
    }

    /// Freezes or unfreezes a parameter, allocating or freeing its gradient.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        let p = &mut self.params[id.0];
        p.trainable = trainable;
        p.grad = if trainable { vec![0.0; p.value.len()] } else { Vec::new() };
    }

    /// [`ParamSet::set_trainable`] for every parameter whose name `pick` accepts.
    pub fn set_trainable_where(&mut self, pick: impl Fn(&str) -> bool, trainable: bool) {
        for i in 0..self.params.len() {
            if pick(&self.params[i].name) {
                self.set_trainable(ParamId(i), trainable);
            }
        }
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).map(|&i| ParamId(i))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Parameters in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut()
    }

    pub fn trainable_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut().filter(|p| p.trainable)
    }

    /// Number of trainable elements.
    pub fn num_trainable(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(Param::numel).sum()
    }

    /// Several distinct parameters borrowed mutably at once. Panics on a repeated id.
    pub fn many_mut<const N: usize>(&mut self, ids: [ParamId; N]) -> [&mut Param; N] {
        let mut out: [Option<&mut Param>; N] = std::array::from_fn(|_| None);
        for (i, p) in self.params.iter_mut().enumerate() {
            if let Some(slot) = ids.iter().position(|id| id.0 == i) {
                out[slot] = Some(p);
            }
        }
        out.map(|p| p.expect("many_mut: ids must be distinct and from this set"))
    }

    pub fn zero_grad(&mut self) {
        self.params.par_iter_mut().for_each(|p| p.grad.fill(0.0));
    }

    pub fn scale_grads(&mut self, s: f32) {
        for p in self.trainable_mut() {
            p.grad.par_iter_mut().with_min_len(4096).for_each(|g| *g *= s);
        }
    }
}

impl std::ops::Index<ParamId> for ParamSet {
    type Output = Param;
    fn index(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }
}

impl std::ops::IndexMut<ParamId> for ParamSet {
    fn index_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }
}

/// Gradient accumulation: the optimizer steps once every `every` micro-batches, on the mean of
/// their gradients (each micro-batch's loss is already a mean over its own tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradAccum {
    pub every: usize,
    /// Micro-batches accumulated since the last step.
    pub seen: usize,
}

impl GradAccum {
    pub fn new(every: usize) -> Self {
        assert!(every > 0, "gradient accumulation needs at least one micro-batch per step");
        GradAccum { every, seen: 0 }
    }

    /// Call after each micro-batch's backward. Returns `true` when the optimizer should step
    /// now, having scaled the summed gradients by `1/every`.
    pub fn micro_step(&mut self, params: &mut ParamSet) -> bool {
        self.seen += 1;
        if self.seen < self.every {
            return false;
        }
        self.seen = 0;
        if self.every > 1 {
            params.scale_grads(1.0 / self.every as f32);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_set_registers_borrows_and_accumulates_train() {
        let mut ps = ParamSet::new();
        let w = ps.add("w", &[2, 2], vec![1.0; 4], true).unwrap();
        let b = ps.add("b", &[2], vec![0.0; 2], true).unwrap();
        let e = ps.register("emb", &Tensor::zeros(&[3, 2]).to_dtype(DType::BF16), false).unwrap();
        assert!(ps.add("w", &[1], vec![0.0], true).is_err(), "duplicate name");
        assert!(ps.add("x", &[3], vec![0.0], true).is_err(), "wrong element count");
        assert_eq!(ps.id("b"), Some(b));
        assert!(ps[w].decay && !ps[b].decay);
        assert!(ps[e].grad.is_empty() && ps[e].value_and_grad().1.is_none());
        assert_eq!(ps.num_trainable(), 6);
        let mut acc = GradAccum::new(2);
        for i in 0..2 {
            let [pw, pb] = ps.many_mut([w, b]);
            pw.grad.iter_mut().for_each(|g| *g += 1.0);
            pb.grad[1] += 3.0;
            assert_eq!(acc.micro_step(&mut ps), i == 1, "steps on the second micro-batch only");
        }
        assert_eq!(ps[w].grad, vec![1.0; 4]);
        assert_eq!(ps[b].grad, vec![0.0, 3.0]);
        ps.zero_grad();
        assert!(ps.iter().all(|p| p.grad.iter().all(|&g| g == 0.0)));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ps.many_mut([w, w]);
        }));
        assert!(r.is_err(), "a repeated id must not alias");
    }
}
