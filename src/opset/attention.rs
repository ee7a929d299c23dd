//! Attention over whole sequences: RoPE, causal grouped-query attention (the LLM) and multi-head
//! fusion attention (the SAGE head), forward and backward.

use super::Buffers;
use anyhow::{bail, Result};

/// `B` sequences of `T` positions, `H` query heads reading `H_kv` key/value heads of size `D`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CausalShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CausalShape {
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }

    /// `lse`, `delta`: `[B, H, T]`.
    pub fn stat_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    pub fn check(&self) -> Result<()> {
        let s = self;
        if s.batch == 0 || s.seq == 0 || s.heads == 0 || s.kv_heads == 0 {
            bail!("causal attention: every size must be positive ({s:?})");
        }
        if !s.heads.is_multiple_of(s.kv_heads) {
            bail!("causal attention: {} query heads cannot share {} key/value heads evenly", s.heads, s.kv_heads);
        }
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) || s.head_dim > 256 {
            bail!("the attention kernels need an even head_dim ≤ 256 (got {})", s.head_dim);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusionShape {
    pub batch: usize,
    /// L: query rows (fact vectors) per sample.
    pub queries: usize,
    /// S: key/value rows (selected patches) per sample.
    pub keys: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl FusionShape {
    /// Elements of `q`/`out` (`[B, L, H, D]`).
    pub fn q_len(&self) -> usize {
        self.batch * self.queries * self.heads * self.head_dim
    }
    /// Elements of `k`/`v` (`[B, S, H, D]`).
    pub fn kv_len(&self) -> usize {
        self.batch * self.keys * self.heads * self.head_dim
    }
    /// Elements of `lse` (`[B, H, L]`).
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.queries
    }
    /// The softmax scale, `1/√D`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// RoPE and the two attentions, forward and backward.
pub trait Attention: Buffers {
    /// RoPE tables `cos`, `sin` `[max_pos, half]` in the op set's form.
    fn rope_tables(&self, cos: &[f32], sin: &[f32], half: usize) -> Result<(Self::Stat, Self::Stat)>;
    /// RoPE in place over `x [rows, heads, 2·half]`, row `r` at position `r % t`; `inverse` is the
    /// backward.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        tables: &(Self::Stat, Self::Stat),
        half: usize,
        rows: usize,
        t: usize,
        heads: usize,
        inverse: bool,
    ) -> Result<()>;
    /// Causal attention: `(out [B, T, H, D], lse)`.
    fn attention(&self, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, s: CausalShape)
        -> Result<(Self::Buf, Self::Stat)>;
    /// Its backward: `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Stat,
        dout: &Self::Buf,
        s: CausalShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// Multi-head fusion attention (`ops::fusion_attn`): `(out [B, L, H, D], lse)`.
    fn fusion_attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: FusionShape,
    ) -> Result<(Self::Buf, Self::Stat)>;
    /// Its backward: `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn fusion_attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Stat,
        dout: &Self::Buf,
        s: FusionShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
}
