//! The `bulkhead-cni` binary: the CNI plugin ([`bulkhead::cni`]) as engines run it, one call
//! per process: `CNI_*` variables, the config on stdin, the result on stdout.

use std::{io::Write as _, process::ExitCode};

fn main() -> ExitCode {
    let env = bulkhead::cni::Env::from_process();
    let (out, ok) = bulkhead::cni::main_with(&env, &mut std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
