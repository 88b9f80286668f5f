//! The `bulkhead` binary: the command line ([`cli`]) over the `bulkhead` library, which does
//! the work and returns typed results for `cli` to print.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
