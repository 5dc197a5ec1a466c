//! `meshtune`: the node binary. All logic lives in the library.

fn main() -> std::process::ExitCode {
    meshtune_node::cli::main()
}
