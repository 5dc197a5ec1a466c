//! `meshtune`: the node binary. All logic lives in the library.

/// Keeps large freed tensor buffers for reuse instead of returning them to the OS on every
/// step (see `meshtune_model::alloc`).
#[global_allocator]
static ALLOCATOR: meshtune_model::alloc::CachingAllocator = meshtune_model::alloc::CachingAllocator;

fn main() -> std::process::ExitCode {
    meshtune_node::cli::main()
}
