//! The `bulkhead` binary: all the work happens in the library (`bulkhead::cli`).

fn main() -> std::process::ExitCode {
    bulkhead::cli::main()
}
