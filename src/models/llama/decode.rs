//! KV-cached generation on the device op set. A right-padded batch of prompts is prefilled by the
//! step's forward ([`Llama::prefill`]: each layer's rotated keys and values go into the
//! cache as they are made), then every decode step ([`Llama::decode`]) runs the new tokens
//! of the unfinished sequences through the blocks at once, with single-query attention over the
//! cache (`kernels/llm_decode.cu`). Padding slots past a prompt are never read: a sequence's next
//! token overwrites the first of them before any query can see it.
//!
//! [`Llama::generate_rows`] keeps one sampler per sequence, seeded alike, so a batch generates
//! what each of its sequences generates alone (tested below); on the GPU the logits are bf16 GEMM
//! outputs, so a greedy choice between logits closer than that may differ from the CPU's. The
//! host waits once per generated token, for the logits it samples from.

use super::Llama;
use crate::models::sampling::{Sampler, Sampling};
use crate::ops::loss::IGNORE;
use crate::opset::GemmSpec;
use crate::opset::{DecodeShape, StepOps};
use crate::user_bail;
use anyhow::{bail, Result};

/// Every layer's keys and values for `shape.seqs` sequences of `shape.slots` positions, and how
/// many positions of each sequence are filled.
pub struct KvCache<O: StepOps> {
    pub(super) k: Vec<O::Buf>,
    pub(super) v: Vec<O::Buf>,
    shape: DecodeShape,
    len: Vec<usize>,
}

impl<O: StepOps> KvCache<O> {
    pub fn shape(&self) -> DecodeShape {
        self.shape
    }

    /// Positions filled in sequence `seq`.
    pub fn len(&self, seq: usize) -> usize {
        self.len[seq]
    }
}

/// What the forward's blocks need to fill a cache: the cache and each row's (sequence, position).
pub(super) struct CacheFill<'a, O: StepOps> {
    pub cache: &'a mut KvCache<O>,
    pub seq: O::Ids,
    pub pos: O::Ids,
}

impl<O: StepOps> Llama<O> {
    /// An empty cache of `seqs` sequences of `slots` positions (at most the model's context).
    pub fn new_cache(&self, seqs: usize, slots: usize) -> Result<KvCache<O>> {
        let c = &self.config;
        if slots > c.context_length {
            user_bail!("a cache of {slots} positions exceeds the model's context of {}", c.context_length);
        }
        let shape = DecodeShape { seqs, slots, heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        shape.check_shape()?;
        let layer = |_| self.ops.zeros(shape.cache_len());
        Ok(KvCache {
            k: (0..self.blocks.len()).map(layer).collect::<Result<_>>()?,
            v: (0..self.blocks.len()).map(layer).collect::<Result<_>>()?,
            shape,
            len: vec![0; seqs],
        })
    }

    /// Runs the prompts `x [B·T, d]` (right-padded to `T`, `lens[b]` real positions each) through
    /// the decoder, filling sequences `0..B` of `cache`; returns the final hidden states
    /// `[B·T, d]` (rows past a prompt's length are padding).
    pub fn prefill(&self, x: O::Buf, t: usize, lens: &[usize], cache: &mut KvCache<O>) -> Result<O::Buf> {
        let batch = lens.len();
        let s = cache.shape;
        if batch == 0 || batch > s.seqs || t == 0 || t > s.slots {
            bail!("prefill of {batch} prompts of {t} positions into a cache of {} × {}", s.seqs, s.slots);
        }
        if let Some(&bad) = lens.iter().find(|&&l| l == 0 || l > t) {
            bail!("prefill: a prompt of {bad} positions in a batch padded to {t}");
        }
        let rows = batch * t;
        // In bounds: batch ≤ seqs and T ≤ slots (checked above).
        let seq: Vec<u32> = (0..rows).map(|r| (r / t) as u32).collect();
        let pos: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
        let fill = CacheFill { seq: self.ops.upload_ids(&seq)?, pos: self.ops.upload_ids(&pos)?, cache: &mut *cache };
        let fwd = self.forward_rows_filling(x, &vec![IGNORE; rows], batch, false, Some(fill))?;
        cache.len[..batch].copy_from_slice(lens);
        Ok(fwd.hidden)
    }

    /// One decode step: row `n` of `x [N, d]` is the next input of cache sequence `seqs[n]`, at
    /// the position after its filled ones. Appends each layer's keys and values and returns the
    /// final hidden states `[N, d]`.
    pub fn decode(&self, x: O::Buf, seqs: &[usize], cache: &mut KvCache<O>) -> Result<O::Buf> {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if seqs.is_empty() || sorted.len() != seqs.len() {
            bail!("decode: a step needs distinct sequences (got {seqs:?})");
        }
        self.extend(x, seqs, cache)
    }

    /// Appends rows to cached sequences: row `n` of `x [N, d]` goes to sequence `seqs[n]` at the
    /// position after that sequence's filled ones and its earlier rows here, so a sequence may
    /// take several rows at once (a prompt's continuation after a shared, cached prefix). Each row
    /// attends to its sequence's positions up to its own. Returns the final hidden states `[N, d]`.
    pub fn extend(&self, mut x: O::Buf, seqs: &[usize], cache: &mut KvCache<O>) -> Result<O::Buf> {
        let (c, o) = (&self.config, &self.ops);
        let n = seqs.len();
        let s = cache.shape;
        if n == 0 {
            bail!("extend: no rows");
        }
        if let Some(&bad) = seqs.iter().find(|&&b| b >= s.seqs) {
            bail!("extend: sequence {bad} is not in a cache of {}", s.seqs);
        }
        let mut next = cache.len.clone();
        let mut pos = Vec::with_capacity(n);
        for &b in seqs {
            if next[b] >= s.slots {
                user_bail!("sequence {b} already fills all {} positions of its cache", s.slots);
            }
            pos.push(next[b] as u32);
            next[b] += 1;
        }
        let seq: Vec<u32> = seqs.iter().map(|&b| b as u32).collect();
        // In bounds: every sequence is in the cache and has a free slot for each row (checked above).
        let (seq_d, pos_d) = (o.upload_ids(&seq)?, o.upload_ids(&pos)?);
        let (eps, half, kvd) = (c.rms_norm_eps, c.head_dim / 2, c.num_kv_heads * c.head_dim);
        for (i, b) in self.blocks.iter().enumerate() {
            let (h1, _) = o.rmsnorm(&x, self.w(b.attn_norm), n, eps)?;
            let [mut q, mut k, v]: [O::Buf; 3] = self
                .linears_of(&[&b.attn_q, &b.attn_k, &b.attn_v], &h1, n)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("three projections"))?;
            o.rope_at(&mut q, &self.rope, half, c.num_heads, &pos_d, n)?;
            o.rope_at(&mut k, &self.rope, half, c.num_kv_heads, &pos_d, n)?;
            o.kv_append(&k, &seq_d, &pos_d, n, kvd, s.slots, &mut cache.k[i])?;
            o.kv_append(&v, &seq_d, &pos_d, n, kvd, s.slots, &mut cache.v[i])?;
            let ctx = o.decode_attention(&q, &cache.k[i], &cache.v[i], s, &seq_d, &pos_d, n)?;
            let (x1, _) = self.linear(&b.attn_output, &ctx, n, Some(x))?;
            let (h2, _) = o.rmsnorm(&x1, self.w(b.ffn_norm), n, eps)?;
            let [gate, up]: [O::Buf; 2] = self
                .linears_of(&[&b.ffn_gate, &b.ffn_up], &h2, n)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("two projections"))?;
            let act = o.swiglu(&gate, &up)?;
            x = self.linear(&b.ffn_down, &act, n, Some(x1))?.0;
        }
        cache.len = next;
        Ok(o.rmsnorm(&x, self.w(self.output_norm), n, eps)?.0)
    }

    /// Copies the first `len` positions of sequence `from_seq` of cache `from` into sequence
    /// `to_seq` of cache `to` (every layer's keys and values), which then holds exactly those.
    pub fn copy_prefix(
        &self,
        from: &KvCache<O>,
        from_seq: usize,
        to: &mut KvCache<O>,
        to_seq: usize,
        len: usize,
    ) -> Result<()> {
        let (a, b) = (from.shape, to.shape);
        let w = a.kv_heads * a.head_dim;
        if from_seq >= a.seqs
            || to_seq >= b.seqs
            || len > from.len[from_seq]
            || len > b.slots
            || w != b.kv_heads * b.head_dim
        {
            bail!("copy_prefix: {len} positions of sequence {from_seq} ({a:?}) into sequence {to_seq} ({b:?})");
        }
        for i in 0..self.blocks.len() {
            self.ops.copy_rows(&from.k[i], from_seq * a.slots, &mut to.k[i], to_seq * b.slots, len, w)?;
            self.ops.copy_rows(&from.v[i], from_seq * a.slots, &mut to.v[i], to_seq * b.slots, len, w)?;
        }
        to.len[to_seq] = len;
        Ok(())
    }

    /// The logits of rows `rows` of `hidden [*, d]`, read back to the host `[rows.len(), V]`.
    pub fn logits_of_rows(&self, hidden: &O::Buf, rows: &[u32]) -> Result<Vec<f32>> {
        let (o, d) = (&self.ops, self.config.hidden_size);
        // Gathering rows is an embedding lookup with `hidden` as the table.
        let h = o.embed(hidden, rows, d)?;
        let logits = match self.head_q {
            Some(q) => o.qlinear(&h, &self.qweights[q], rows.len(), None, None)?,
            None => o.gemm_new(&GemmSpec::linear(rows.len(), self.config.vocab_size, d), &h, self.lm_head()?)?,
        };
        o.download(&logits)
    }

    /// Generates after each prompt of `x [B·T, d]` (right-padded to `T`, `lens[b]` positions each):
    /// up to `max_new` tokens per sequence, stopping before the first token in `stop_ids` (not
    /// returned) or when the model's positions run out.
    pub fn generate_rows(
        &self,
        x: O::Buf,
        t: usize,
        lens: &[usize],
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_rows_with(x, t, lens, max_new, stop_ids, sampling, |_, _| Ok(()))
    }

    /// [`Llama::generate_rows`], calling `on_token(sequence, token)` as each token is chosen (a
    /// chat streams its reply from here).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_rows_with(
        &self,
        x: O::Buf,
        t: usize,
        lens: &[usize],
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
        mut on_token: impl FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Vec<u32>>> {
        let n = lens.len();
        let mut outs: Vec<Vec<u32>> = vec![Vec::new(); n];
        if max_new == 0 || n == 0 {
            return Ok(outs);
        }
        let max_pos = self.config.context_length;
        if t > max_pos {
            user_bail!("prompts of {t} positions exceed the model's {max_pos}");
        }
        // The last token decoded sits at position ≤ T + max_new − 2.
        let mut cache = self.new_cache(n, (t + max_new).min(max_pos))?;
        let hidden = self.prefill(x, t, lens, &mut cache)?;
        let last: Vec<u32> = lens.iter().enumerate().map(|(b, &l)| (b * t + l - 1) as u32).collect();
        let mut logits = self.logits_of_rows(&hidden, &last)?;
        drop(hidden);
        let vocab = self.config.vocab_size;
        // One generator per row, each with its own stream: rows with the same prompt (GRPO's
        // groups) must draw different answers. Row 0 keeps the seed, so a single prompt samples
        // as it always did.
        let mut samplers: Vec<Sampler> = (0..n).map(|b| Sampler::new(sampling.for_row(b))).collect();
        let mut next = vec![0u32; n];
        let mut active: Vec<usize> = (0..n).collect();
        loop {
            let mut still = Vec::with_capacity(active.len());
            for (j, &b) in active.iter().enumerate() {
                let tok = samplers[b].sample(&logits[j * vocab..(j + 1) * vocab]);
                if stop_ids.contains(&tok) {
                    continue;
                }
                outs[b].push(tok);
                on_token(b, tok)?;
                if outs[b].len() < max_new && cache.len(b) < max_pos {
                    next[b] = tok;
                    still.push(b);
                }
            }
            active = still;
            if active.is_empty() {
                return Ok(outs);
            }
            let ids: Vec<u32> = active.iter().map(|&b| next[b]).collect();
            let x = self.embed_tokens(&ids)?;
            let hidden = self.decode(x, &active, &mut cache)?;
            let rows: Vec<u32> = (0..active.len() as u32).collect();
            logits = self.logits_of_rows(&hidden, &rows)?;
        }
    }

    /// [`Llama::generate_rows`] from token prompts (right-padded and embedded here).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if prompts.iter().any(Vec::is_empty) {
            user_bail!("generation needs a non-empty prompt for every sequence");
        }
        let ids: Vec<u32> =
            prompts.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat_n(0, t - p.len()))).collect();
        let x = self.embed_tokens(&ids)?;
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.generate_rows(x, t, &lens, max_new, stop_ids, sampling)
    }
}
