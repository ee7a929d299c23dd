//! A model's parameters on the host: a flat, named set of f32 tensors, each trainable or frozen.
//!
//! Model code registers each weight once and keeps the returned [`ParamId`]; a model on an op set
//! is built from the set (`models::llama::Llama::new`) and copies its trained weights back into it
//! for checkpoints. Gradients and optimizer state live on the op set, not here.

use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
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
        let id = ParamId(self.params.len());
        self.by_name.insert(name.clone(), id.0);
        self.params.push(Param { name, shape: shape.to_vec(), value, trainable, decay: shape.len() >= 2 });
        Ok(id)
    }

    /// Registers a tensor (any dtype; stored as f32).
    pub fn register(&mut self, name: impl Into<String>, t: &Tensor, trainable: bool) -> Result<ParamId> {
        let shape = t.shape().to_vec();
        self.add(name, &shape, t.to_dtype(DType::F32).into_f32s()?, trainable)
    }

    /// Freezes or unfreezes a parameter.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        self.params[id.0].trainable = trainable;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_set_registers_by_name_and_refuses_duplicates() {
        let mut ps = ParamSet::new();
        let w = ps.add("w", &[2, 2], vec![1.0; 4], true).unwrap();
        let b = ps.add("b", &[2], vec![0.0; 2], true).unwrap();
        let e = ps.register("emb", &Tensor::zeros(&[3, 2]).to_dtype(DType::BF16), false).unwrap();
        assert!(ps.add("w", &[1], vec![0.0], true).is_err(), "duplicate name");
        assert!(ps.add("x", &[3], vec![0.0], true).is_err(), "wrong element count");
        assert_eq!(ps.id("b"), Some(b));
        assert!(ps[w].decay && !ps[b].decay, "matrices decay, vectors do not");
        assert_eq!((ps[e].value.len(), ps[e].trainable), (6, false));
        assert_eq!(ps.num_trainable(), 6);
        ps.set_trainable_where(|n| n == "w", false);
        assert_eq!(ps.num_trainable(), 2);
    }
}
