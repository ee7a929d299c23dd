//! The CPU backend: the op set ([`crate::opset`]) on the CPU reference ops of [`crate::ops`].

mod host_ops;
pub mod malloc;

pub use host_ops::HostOps;
