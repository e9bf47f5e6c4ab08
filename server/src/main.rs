//! `sglang-server`: the HTTP server (SGLang's native API and the OpenAI API) and the
//! command-line front end of the engine.
//!
//! `sglang-server [OPTIONS]` (or `sglang-server serve [OPTIONS]`) serves;
//! `sglang-server generate --prompt TEXT` generates once and prints;
//! `sglang-server bench` times the model step.

mod args;
mod backup;
mod bench;
mod generate;
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
    /// Back up a running server (configuration, model identity, prefix cache) or restore one.
    Backup(backup::BackupArgs),
    /// Exit 0 if a server's /health answers 200 (container health checks; no curl needed).
    Probe {
        /// The server to probe.
        #[arg(
            long,
            env = "SGLANG_PROBE_URL",
            default_value = "http://127.0.0.1:30000"
        )]
        url: String,
        /// The path to request.
        #[arg(long, default_value = "/health")]
        path: String,
    },
}

fn init_logging(level: &str) {
    init_logging_to(level, None);
}

/// Logs to stderr and, with `file`, to that file as well (`--log-file`, appended).
fn init_logging_to(level: &str, file: Option<&std::path::Path>) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SGLANG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match file.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    }) {
        Some(Ok(f)) => builder
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .init(),
        Some(Err(e)) => {
            eprintln!("error: invalid option `log-file`: {e}");
            std::process::exit(1);
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
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
        Some(Command::Backup(a)) => {
            init_logging("warn");
            backup::run(a)
        }
        Some(Command::Probe { url, path }) => {
            let c = backup::Common {
                server_url: url,
                backup_dir: Default::default(),
                admin_api_key: None,
            };
            backup::call(&c, hyper::Method::GET, &path, None).map(|_| ())
        }
        Some(Command::Serve(a)) => {
            init_logging_to(&a.log_level, a.log_file.as_deref());
            serve::run(a)
        }
        None => {
            init_logging_to(&cli.serve.log_level, cli.serve.log_file.as_deref());
            serve::run(cli.serve)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
