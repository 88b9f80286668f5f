//! `cargo xtask`: the project's own automation, one module per verb.
//!
//! Keep this crate small and quick to compile: it shells out to cargo, rustup, apt and the built
//! binaries, and holds no datapath or container logic of its own.

mod bench;
mod build;
mod run;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Install what the build and the tests need (idempotent; says what it skips).
    Setup,
    /// Build the eBPF object (nightly), `bulkhead` embedding it, and static `bulkhead-init`.
    Build(build::Options),
    /// The demo: setup, build, then a service balanced across three backend namespaces.
    BuildAndRun(run::DemoOptions),
    /// Setup, build, then every test of the workspace, integration tests included.
    Test(test::Options),
    /// Benchmarks against the usual alternatives, reported as ratios (target/bench/).
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Setup => setup::run(),
        Verb::Build(opts) => build::run(&opts).map(drop),
        Verb::BuildAndRun(opts) => run::run(&opts),
        Verb::Test(opts) => test::run(&opts),
        Verb::Bench(opts) => bench::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
