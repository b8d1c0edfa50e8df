//! The `kobe` binary: Kobe's command line with its built-in tasks. A binary of your own adds its
//! tasks the same way (see `examples/custom_worker.rs`).

use std::process::ExitCode;

fn main() -> ExitCode {
    kobe::App::new().with_builtin_tasks().run()
}
