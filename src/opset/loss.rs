//! Losses: the LM cross-entropy, sequence log-probabilities and the E-DPO loss, each with its
//! gradient, without `[rows, V]` logits in memory where the backend can avoid it.

use super::Buffers;
use anyhow::Result;

/// The cross-entropy's results (see [`Losses::cross_entropy`]).
pub struct CrossEntropyOut<O: Buffers + ?Sized> {
    /// `Σ_t log p(target_t)` per sequence, `[B]` (the loss is `−Σ_n seq_weights[n]·seq_logp[n]`).
    pub seq_logp: O::Stat,
    /// `∂loss/∂hidden` `[B·T, C]`, zero at ignored positions.
    pub d_hidden: O::Buf,
}

/// One preference pair: indices of the chosen (winning) and rejected sequences and
/// `ΔH = H(a_chosen) − H(a_rejected)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub chosen: usize,
    pub rejected: usize,
    pub delta_h: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdpoConfig {
    pub beta: f32,
    /// Weight of the entropy-difference term; 0 gives plain DPO.
    pub eta: f32,
}

/// The training losses and their gradients.
pub trait Losses: Buffers {
    /// The weighted cross-entropy `−Σ_n seq_weights[n]·Σ_t log p(target)` of `hidden [B·T, C]`
    /// through the LM head `w [V, C]` against `targets [B·T]` (`IGNORE` skips a position),
    /// forward and backward, without `[B·T, V]` logits in memory where the op set can avoid it.
    /// A weight of `1/counted` everywhere is the batch's mean token loss; `1/(B·counted_n)` the
    /// mean of the sequences' means. With `d_weight` (`[V, C]`, its contents ignored), the LM
    /// head's gradient is written there: the caller owns the buffer, so a training loop reuses
    /// one across steps instead of a fresh vocabulary-sized allocation each step (a frozen head
    /// passes `None`).
    fn cross_entropy(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        seq_weights: &[f32],
        d_weight: Option<&mut Self::Buf>,
    ) -> Result<CrossEntropyOut<Self>>;
    /// Sequence log-probabilities `Σ_t log p(target_t)` of `seqs` sequences of `hidden [N·T, C]`
    /// through the LM head `w [V, C]` (`IGNORE` targets skipped), and the per-row log-sum-exp
    /// the backward reads: `(seq [N], lse [N·T])`.
    fn seq_logprobs(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Self::Stat, Self::Stat)>;
    /// The E-DPO loss (mean over `pairs` of `−log σ(d)`) of policy and reference sequence
    /// log-probabilities: `(margins d [P], ∂loss/∂policy [N])`.
    fn edpo_loss(
        &self,
        policy: &Self::Stat,
        reference: &Self::Stat,
        pairs: &[Pair],
        cfg: EdpoConfig,
    ) -> Result<(Self::Stat, Self::Stat)>;
    /// The gradient of `Σ_n grad_seq[n]·seq[n]` ([`Losses::seq_logprobs`]) with respect to
    /// `hidden` (returned) and, with `d_weight` (contents ignored), `w`, written there as in
    /// [`Losses::cross_entropy`].
    #[allow(clippy::too_many_arguments)]
    fn logprob_backward(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        lse: &Self::Stat,
        grad_seq: &Self::Stat,
        seqs: usize,
        d_weight: Option<&mut Self::Buf>,
    ) -> Result<Self::Buf>;
}
