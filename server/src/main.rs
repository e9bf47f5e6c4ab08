//! `sglang-server`: the command-line front end of the engine.
//!
//! Subcommands: `generate` (one prompt, printed or as JSON).

mod args;
mod generate;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sglang-server",
    version,
    about = "LLM inference engine and server for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate from one prompt and print the result.
    Generate(generate::GenerateArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SGLANG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
