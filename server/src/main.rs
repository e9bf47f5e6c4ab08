//! `sglang-server`: the HTTP server (SGLang's native API and the OpenAI API) and the
//! command-line front end of the engine.
//!
//! `sglang-server [OPTIONS]` (or `sglang-server serve [OPTIONS]`) serves;
//! `sglang-server generate --prompt TEXT` generates once and prints;
//! `sglang-server bench` times the model step.

mod args;
mod bench;
mod generate;
mod health;
mod http;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sglang-server",
    version,
    about = "LLM inference server for Llama-family models: SGLang's native API and the OpenAI API",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: args::ServerArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the model over HTTP (the default).
    Serve(args::ServerArgs),
    /// Generate from one prompt and print the result.
    Generate(generate::GenerateArgs),
    /// Time the model step alone: prompt processing, decode, bandwidth, peak memory.
    Bench(bench::BenchArgs),
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SGLANG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Generate(a)) => {
            init_logging("info");
            generate::run(a)
        }
        Some(Command::Bench(a)) => {
            init_logging("warn");
            bench::run(a)
        }
        Some(Command::Serve(a)) => {
            init_logging(&a.log_level);
            serve::run(a)
        }
        None => {
            init_logging(&cli.serve.log_level);
            serve::run(cli.serve)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
