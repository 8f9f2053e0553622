//! `tern`: a KVM VMM built for live migration. See README.md and docs/architecture.md.

use clap::Parser;

use tern::args::{Cli, Command};
use tern::{demo, run, tools};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(a) => run::run(a),
        Command::GuestImage { output, x_pvh_test } => tools::guest_image(&output, x_pvh_test),
        Command::CheckPattern(a) => tools::check_pattern(&a),
        Command::AnalyzeStream { file } => tools::analyze_stream(&file),
        Command::Snapshot { qmp, file } => tools::snapshot(&qmp, &file),
        Command::Restore(a) => tools::restore(a),
        Command::Demo(a) => demo::demo(&a),
    };
    if let Err(e) = r {
        eprintln!("tern: error: {e:#}");
        std::process::exit(1);
    }
}
