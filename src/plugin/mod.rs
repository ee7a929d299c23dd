//! The host side of the plugin ABI (`plugins/include/sage_plugin.h`): discovery, loading with
//! every refusal explained, and safe wrappers over plugin instances.

pub mod datasets;
pub mod host;
pub mod loader;
pub mod probe;

pub use loader::{discover, CallError, Discovery, Instance, Kind, LoadedPlugin, Refusal};
