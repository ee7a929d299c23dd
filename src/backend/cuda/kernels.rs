//! The kernel sources, embedded in the binary, and their PTX: from the on-disk cache when
//! `sage kernels build` (or an earlier run) put it there, else compiled by NVRTC 13.0 now.

use crate::backend::nvrtc::{self, Arch};
use anyhow::{Context, Result};

/// One `kernels/*.cu` file and the entry points the backend launches from it.
#[derive(Debug)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

pub static MINCOS_TOPK: KernelFile = KernelFile {
    name: "mincos_topk.cu",
    source: include_str!("../../../kernels/mincos_topk.cu"),
    entries: &["mincos_inv_norms", "mincos_reduce_v1", "mincos_reduce_v2", "mincos_merge_topk", "mincos_gather"],
};

pub static FUSION_ATTN: KernelFile = KernelFile {
    name: "fusion_attn.cu",
    source: include_str!("../../../kernels/fusion_attn.cu"),
    entries: &["fusion_attn_fwd", "fusion_attn_bwd_delta", "fusion_attn_bwd_dq", "fusion_attn_bwd_dkdv"],
};

pub static EDPO_LOSS: KernelFile = KernelFile {
    name: "edpo_loss.cu",
    source: include_str!("../../../kernels/edpo_loss.cu"),
    entries: &["edpo_logits_lse_partial", "edpo_lse_combine_seqsum", "edpo_loss_fwd", "edpo_dlogits"],
};

pub static LLM_OPS: KernelFile = KernelFile {
    name: "llm_ops.cu",
    source: include_str!("../../../kernels/llm_ops.cu"),
    entries: &[
        "rmsnorm_fwd",
        "rmsnorm_bwd_dx",
        "rmsnorm_bwd_dw_partial",
        "sum_rows_f32",
        "swiglu_fwd",
        "swiglu_bwd",
        "adamw_step",
        "adamw_step_bf16",
        "adamw_step_bf16w",
        "sumsq_partial_bf16",
        "sumsq_partial_f32",
        "clip_factor",
    ],
};

pub static HEAD_OPS: KernelFile = KernelFile {
    name: "head_ops.cu",
    source: include_str!("../../../kernels/head_ops.cu"),
    entries: &[
        "layernorm_fwd",
        "layernorm_bwd_dx",
        "layernorm_bwd_dwdb_partial",
        "colsum_partial",
        "gelu_fwd",
        "gelu_bwd",
        "scale_bf16",
        "mul_f32",
    ],
};

pub static LLM_ATTN: KernelFile = KernelFile {
    name: "llm_attn.cu",
    source: include_str!("../../../kernels/llm_attn.cu"),
    entries: &[
        "rope_pairs",
        "causal_attn_fwd",
        "causal_attn_bwd_dq",
        "causal_attn_bwd_dkdv",
        "embedding_fwd",
        "embedding_bwd",
    ],
};

pub static LLM_DECODE: KernelFile = KernelFile {
    name: "llm_decode.cu",
    source: include_str!("../../../kernels/llm_decode.cu"),
    entries: &["rope_pairs_at", "kv_append", "decode_attn", "decode_attn_split", "decode_attn_combine"],
};

pub static DWCONV: KernelFile = KernelFile {
    name: "dwconv.cu",
    source: include_str!("../../../kernels/dwconv.cu"),
    entries: &["dwconv_fwd", "relu6_bwd", "dwconv_bwd_dx", "dwconv_bwd_dw", "channel_bias_act"],
};

pub static QGEMM: KernelFile = KernelFile {
    name: "qgemm.cu",
    source: include_str!("../../../kernels/qgemm.cu"),
    entries: &["qgemm_xwt", "qgemm_dyw", "qembed", "qdequant_rows"],
};

/// The headers the kernel files include, handed to NVRTC with each program (so no source tree is
/// needed at run time) and part of every PTX cache key (so editing one recompiles the kernels).
pub static HEADERS: [nvrtc::Header<'static>; 1] = [("common.cuh", include_str!("../../../kernels/common.cuh"))];

/// Every kernel file the backend uses.
pub static ALL: [&KernelFile; 9] =
    [&MINCOS_TOPK, &FUSION_ATTN, &EDPO_LOSS, &LLM_OPS, &LLM_ATTN, &HEAD_OPS, &LLM_DECODE, &DWCONV, &QGEMM];

/// The PTX of `file` for `arch`: cached, or compiled now (and cached).
pub fn ptx(file: &KernelFile, arch: Arch) -> Result<String> {
    nvrtc::compile_named(file.source, file.name, arch, &HEADERS, &[])
        .with_context(|| format!("compiling kernels/{} for {}", file.name, arch.sm()))
}

/// Where the PTX of `file` for `arch` is (or will be) cached.
pub fn cache_path(file: &KernelFile, arch: Arch) -> std::path::PathBuf {
    nvrtc::cache_path(&nvrtc::cache_dir(), file.source, file.name, arch, &HEADERS, &[])
}
