//! Fuzz machinery shared by tests/fuzz.rs: mutators, the child-process runner, outcome counting,
//! and one module per loader with its seeds, structure-aware mutator and entry point.

pub mod alloc;
pub mod bert;
pub mod datasets;
pub mod gguf;
pub mod images;
pub mod json;
pub mod mutate;
pub mod pth;
pub mod runner;
pub mod toml_cfg;

use runner::Target;

/// Every fuzz target, in the order the tests report them.
pub fn targets() -> Vec<Target> {
    let mut t = vec![];
    t.extend(gguf::targets());
    t.extend(bert::targets());
    t.extend(pth::targets());
    t.extend(images::targets());
    t.extend(toml_cfg::targets());
    t.extend(datasets::targets());
    t
}
