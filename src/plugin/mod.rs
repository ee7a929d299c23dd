//! Plugins: the built-ins compiled into sage and the host side of the plugin ABI
//! (`plugins/include/sage_plugin.h`) — discovery, loading with every refusal explained — behind
//! one instance interface, so callers do not care whether a plugin is built in or loaded.

pub mod backbones;
pub mod builtin;
pub mod discovery;
pub mod host;
pub mod instance;
pub mod loader;
pub mod probe;

pub use discovery::{discover, Discovery, Refusal};
pub use instance::{CallError, Instance, Kind, PluginInfo};
