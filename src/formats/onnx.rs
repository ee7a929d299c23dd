//! ONNX models, read: the graph's nodes (name, op type, inputs, outputs) and its float
//! initializers, which is what a converter needs to name every weight by the node that uses it
//! (`models::dinov2::onnx_names`). Attributes, value infos and other messages are skipped.
//!
//! Only what the converter needs is decoded, over [`super::protobuf`]'s bounds-checked reader: a
//! truncated or corrupt file is a user error naming the file, the byte and the message being read.

use super::protobuf::{fields, Field, Value, WireError};
use crate::user_err;
use anyhow::{Context, Result};
use memmap2::Mmap;
use std::path::Path;

/// ONNX's `TensorProto.DataType.FLOAT`.
const FLOAT: i64 = 1;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    /// `(domain, version)`; the default domain is `""`.
    pub opsets: Vec<(String, i64)>,
    pub graph: Graph,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub initializers: Vec<Initializer>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A constant tensor of the graph. `data` holds the values of a FLOAT tensor; other element types
/// keep their type number and no values (the converters here need floats only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<usize>,
    pub data_type: i64,
    pub data: Vec<f32>,
}

impl Initializer {
    pub fn is_float(&self) -> bool {
        self.data_type == FLOAT
    }
}

impl Graph {
    /// The nodes that read `value` (an initializer or another node's output).
    pub fn consumers<'g>(&'g self, value: &'g str) -> impl Iterator<Item = &'g Node> + 'g {
        self.nodes.iter().filter(move |n| n.inputs.iter().any(|i| i == value))
    }
}

/// Reads `path`; any problem is a user error naming it.
pub fn load(path: &Path) -> Result<Model> {
    let file = std::fs::File::open(path)
        .map_err(|e| user_err!("cannot open ONNX file {}: {e}; check the path or run `sage fetch`", path.display()))?;
    // SAFETY: read-only mapping of a file we do not modify.
    let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    parse(&mmap).map_err(|e| bad_file(path, e))
}

fn bad_file(path: &Path, e: ParseError) -> anyhow::Error {
    user_err!(
        "{} is not a readable ONNX model: {} {}. The file is truncated or corrupt (or not ONNX); \
         re-download it (`sage fetch`) or re-export it",
        path.display(),
        e.context,
        e.wire
    )
}

/// A wire error with the message being read.
#[derive(Debug)]
pub struct ParseError {
    pub context: &'static str,
    pub wire: WireError,
}

fn ctx(context: &'static str) -> impl Fn(WireError) -> ParseError {
    move |wire| ParseError { context, wire }
}

/// Parses a whole `ModelProto` held in memory.
pub fn parse(buf: &[u8]) -> Result<Model, ParseError> {
    let mut model = Model::default();
    let mut graph = None;
    for f in fields(buf, 0) {
        let f = f.map_err(ctx("reading the model"))?;
        match f.number {
            1 => model.ir_version = f.varint().map_err(ctx("reading ir_version"))? as i64,
            7 => graph = Some(parse_graph(&f)?),
            8 => model.opsets.push(parse_opset(&f)?),
            _ => {}
        }
    }
    model.graph = graph.ok_or(ParseError {
        context: "reading the model",
        wire: WireError { at: buf.len(), what: "it has no graph (field 7 of ModelProto)".into() },
    })?;
    Ok(model)
}

fn sub<'a>(f: &Field<'a>, context: &'static str) -> Result<(&'a [u8], usize), ParseError> {
    Ok((f.bytes().map_err(ctx(context))?, f.at))
}

fn parse_opset(f: &Field) -> Result<(String, i64), ParseError> {
    let (buf, base) = sub(f, "reading an opset_import")?;
    let (mut domain, mut version) = (String::new(), 0);
    for g in fields(buf, base) {
        let g = g.map_err(ctx("reading an opset_import"))?;
        match g.number {
            1 => domain = g.string().map_err(ctx("reading an opset domain"))?.to_owned(),
            2 => version = g.varint().map_err(ctx("reading an opset version"))? as i64,
            _ => {}
        }
    }
    Ok((domain, version))
}

fn parse_graph(f: &Field) -> Result<Graph, ParseError> {
    let (buf, base) = sub(f, "reading the graph")?;
    let mut g = Graph::default();
    for h in fields(buf, base) {
        let h = h.map_err(ctx("reading the graph"))?;
        match h.number {
            1 => g.nodes.push(parse_node(&h)?),
            5 => g.initializers.push(parse_tensor(&h)?),
            11 => g.inputs.push(value_info_name(&h)?),
            12 => g.outputs.push(value_info_name(&h)?),
            _ => {}
        }
    }
    Ok(g)
}

fn value_info_name(f: &Field) -> Result<String, ParseError> {
    let (buf, base) = sub(f, "reading a graph input or output")?;
    for h in fields(buf, base) {
        let h = h.map_err(ctx("reading a graph input or output"))?;
        if h.number == 1 {
            return Ok(h.string().map_err(ctx("reading a value name"))?.to_owned());
        }
    }
    Ok(String::new())
}

fn parse_node(f: &Field) -> Result<Node, ParseError> {
    let (buf, base) = sub(f, "reading a node")?;
    let mut n = Node::default();
    for h in fields(buf, base) {
        let h = h.map_err(ctx("reading a node"))?;
        let s = || h.string().map(str::to_owned).map_err(ctx("reading a node's strings"));
        match h.number {
            1 => n.inputs.push(s()?),
            2 => n.outputs.push(s()?),
            3 => n.name = s()?,
            4 => n.op_type = s()?,
            _ => {}
        }
    }
    Ok(n)
}

fn parse_tensor(f: &Field) -> Result<Initializer, ParseError> {
    const CONTEXT: &str = "reading an initializer";
    let (buf, base) = sub(f, CONTEXT)?;
    let mut t = Initializer::default();
    let mut dims = Vec::new();
    let (mut raw, mut floats, mut external) = (None, Vec::new(), false);
    for h in fields(buf, base) {
        let h = h.map_err(ctx(CONTEXT))?;
        match h.number {
            1 => h.push_varints(&mut dims).map_err(ctx("reading an initializer's dims"))?,
            2 => t.data_type = h.varint().map_err(ctx(CONTEXT))? as i64,
            4 => match h.value {
                Value::Fixed32(v) => floats.push(f32::from_bits(v)),
                Value::Bytes(b) => floats.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()))),
                _ => {
                    return Err(ParseError { context: CONTEXT, wire: wire(h.at, "float_data has the wrong wire type") })
                }
            },
            8 => t.name = h.string().map_err(ctx(CONTEXT))?.to_owned(),
            9 => raw = Some(h.bytes().map_err(ctx(CONTEXT))?),
            14 => external = h.varint().map_err(ctx(CONTEXT))? == 1,
            _ => {}
        }
    }
    let at = f.at;
    if dims.iter().any(|&d| d < 0) {
        return Err(ParseError {
            context: CONTEXT,
            wire: wire(at, &format!("`{}` has a negative dimension {dims:?}", t.name)),
        });
    }
    t.dims = dims.iter().map(|&d| d as usize).collect();
    if external {
        return Err(ParseError {
            context: CONTEXT,
            wire: wire(
                at,
                &format!("`{}` keeps its data in an external file, which this reader does not follow", t.name),
            ),
        });
    }
    if t.data_type == FLOAT {
        let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
        t.data = match raw {
            Some(b) => {
                if b.len() != n.saturating_mul(4) {
                    return Err(ParseError {
                        context: CONTEXT,
                        wire: wire(
                            at,
                            &format!("`{}` has shape {:?} ({n} floats) but {} bytes of data", t.name, t.dims, b.len()),
                        ),
                    });
                }
                b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            }
            None => floats,
        };
        if t.data.len() != n {
            return Err(ParseError {
                context: CONTEXT,
                wire: wire(
                    at,
                    &format!("`{}` has shape {:?} ({n} floats) but {} values", t.name, t.dims, t.data.len()),
                ),
            });
        }
    }
    Ok(t)
}

fn wire(at: usize, what: &str) -> WireError {
    WireError { at, what: what.to_owned() }
}

#[cfg(test)]
pub(crate) mod build {
    //! Writes small ONNX models for tests (the fields [`super::parse`] reads).
    use super::super::protobuf::encode;

    pub struct Tensor<'a> {
        pub name: &'a str,
        pub dims: &'a [u64],
        pub data: &'a [f32],
    }

    pub struct NodeSpec<'a> {
        pub name: &'a str,
        pub op: &'a str,
        pub inputs: &'a [&'a str],
        pub outputs: &'a [&'a str],
    }

    pub fn model(nodes: &[NodeSpec], tensors: &[Tensor]) -> Vec<u8> {
        let mut graph = Vec::new();
        for n in nodes {
            let mut m = Vec::new();
            for i in n.inputs {
                encode::bytes(1, i.as_bytes(), &mut m);
            }
            for o in n.outputs {
                encode::bytes(2, o.as_bytes(), &mut m);
            }
            encode::bytes(3, n.name.as_bytes(), &mut m);
            encode::bytes(4, n.op.as_bytes(), &mut m);
            encode::bytes(1, &m, &mut graph);
        }
        for t in tensors {
            let mut m = Vec::new();
            let mut dims = Vec::new();
            for &d in t.dims {
                encode::varint(d, &mut dims);
            }
            encode::bytes(1, &dims, &mut m);
            encode::int(2, 1, &mut m);
            encode::bytes(8, t.name.as_bytes(), &mut m);
            let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            encode::bytes(9, &raw, &mut m);
            encode::bytes(5, &m, &mut graph);
        }
        let mut model = Vec::new();
        encode::int(1, 7, &mut model);
        encode::bytes(7, &graph, &mut model);
        let mut opset = Vec::new();
        encode::int(2, 14, &mut opset);
        encode::bytes(8, &opset, &mut model);
        model
    }
}

#[cfg(test)]
mod tests {
    use super::build::{model, NodeSpec, Tensor};
    use super::*;

    fn tiny() -> Vec<u8> {
        model(
            &[NodeSpec { name: "/fc/MatMul", op: "MatMul", inputs: &["x", "onnx::MatMul_1"], outputs: &["y"] }],
            &[Tensor { name: "onnx::MatMul_1", dims: &[2, 3], data: &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0] }],
        )
    }

    #[test]
    fn reads_nodes_initializers_and_opsets() {
        let m = parse(&tiny()).unwrap();
        assert_eq!(m.ir_version, 7);
        assert_eq!(m.opsets, [(String::new(), 14)]);
        assert_eq!(m.graph.nodes[0].name, "/fc/MatMul");
        assert_eq!(m.graph.nodes[0].inputs, ["x", "onnx::MatMul_1"]);
        let t = &m.graph.initializers[0];
        assert_eq!((t.dims.as_slice(), t.is_float()), (&[2usize, 3][..], true));
        assert_eq!(t.data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(m.graph.consumers("onnx::MatMul_1").count(), 1);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny();
        for n in 0..full.len() {
            // A prefix either fails or (cut exactly between fields) parses with less in it.
            if let Ok(m) = parse(&full[..n]) {
                assert!(m.graph.initializers.is_empty() || m.graph.initializers[0].data.len() == 6);
            }
        }
        let e = parse(&full[..full.len() - 3]).unwrap_err();
        assert!(e.wire.what.contains("truncated"), "{e:?}");
    }

    #[test]
    fn shape_and_data_must_agree() {
        let bad = model(&[], &[Tensor { name: "w", dims: &[2, 2], data: &[1.0, 2.0, 3.0] }]);
        let e = parse(&bad).unwrap_err();
        assert!(e.wire.what.contains("`w` has shape [2, 2] (4 floats) but 12 bytes"), "{e:?}");
    }
}
