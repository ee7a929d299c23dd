//! KV-cached decoding: RoPE at explicit positions, the cache append and single-query attention
//! over the cache. The caller checks every (sequence, position) pair against the cache with
//! [`DecodeShape::check`] before uploading it.

use super::Buffers;
use anyhow::{bail, Result};

/// A key/value cache of `seqs` sequences of `slots` positions, `kv_heads` heads of `head_dim`,
/// read by `heads` query heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub seqs: usize,
    pub slots: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl DecodeShape {
    /// Elements of one cache tensor, `[seqs, slots, kv_heads, head_dim]`.
    pub fn cache_len(&self) -> usize {
        self.seqs * self.slots * self.kv_heads * self.head_dim
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Checks the shape: positive sizes, grouped heads, a head size the kernels take.
    pub fn check_shape(&self) -> Result<()> {
        let s = self;
        if s.seqs == 0 || s.slots == 0 || s.heads == 0 || s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            bail!("decode attention: bad shape {s:?} (positive sizes, heads a multiple of kv_heads)");
        }
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) || s.head_dim > 256 {
            bail!("the decode kernels need an even head_dim ≤ 256 (got {})", s.head_dim);
        }
        Ok(())
    }

    /// Checks the shape and the rows' (sequence, position) pairs against it.
    pub fn check(&self, seq: &[u32], pos: &[u32]) -> Result<()> {
        let s = self;
        s.check_shape()?;
        if seq.len() != pos.len() {
            bail!("decode: {} sequence indices for {} positions", seq.len(), pos.len());
        }
        if let Some((r, (&b, &p))) =
            seq.iter().zip(pos).enumerate().find(|(_, (&b, &p))| b as usize >= s.seqs || p as usize >= s.slots)
        {
            bail!("decode row {r}: sequence {b} position {p} is outside the cache ({} × {})", s.seqs, s.slots);
        }
        Ok(())
    }
}

/// The decode step's ops.
pub trait Decode: Buffers {
    /// RoPE over `x [rows, heads, 2·half]`, row `r` at position `pos[r]`.
    fn rope_at(
        &self,
        x: &mut Self::Buf,
        tables: &(Self::Stat, Self::Stat),
        half: usize,
        heads: usize,
        pos: &Self::Ids,
        rows: usize,
    ) -> Result<()>;
    /// `cache[seq[r], pos[r], :] = src[r, :]` for rows of `width` into `[seqs, slots, width]`.
    #[allow(clippy::too_many_arguments)]
    fn kv_append(
        &self,
        src: &Self::Buf,
        seq: &Self::Ids,
        pos: &Self::Ids,
        rows: usize,
        width: usize,
        slots: usize,
        cache: &mut Self::Buf,
    ) -> Result<()>;
    /// Single-query attention `out [rows, H, D]`: query `n` (of sequence `seq[n]`) over that
    /// sequence's cached keys and values `0..=pos[n]`.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        s: DecodeShape,
        seq: &Self::Ids,
        pos: &Self::Ids,
        rows: usize,
    ) -> Result<Self::Buf>;
}
