//! The meshtune node: command line, model commands and (later) the mesh.

pub mod cli;
pub mod commands;
pub mod device;
pub mod logging;
pub mod plot;
