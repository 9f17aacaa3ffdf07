//! Renders the report files of the run directories given as arguments (what `squall
//! report <run-dir>` does): `cargo run -p squall-report --example render -- reports/<run>`.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for dir in std::env::args().skip(1) {
        match squall_report::render_run_dir(Path::new(&dir)) {
            Ok(r) => {
                println!(
                    "{dir}: {:?}: {}",
                    r.report.outcome.result, r.report.outcome.reason
                );
                for f in r.files {
                    println!("  {}", f.display());
                }
            }
            Err(e) => {
                eprintln!("{dir}: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}
