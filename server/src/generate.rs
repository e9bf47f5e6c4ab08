//! `sglang-server generate`: one prompt through the engine, printed as it streams (or as one
//! JSON object with `--json`).

use std::io::Write;

use clap::Args;
use sglang::engine::{EngineHandle, Event, GenerateRequest, Matched};
use sglang::tokenizer::ChatMessage;

use crate::args::{EngineArgs, SamplingArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as one user message through the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object (text, output_ids, finish_reason, usage) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Also return the logprob of each token and this many alternatives (with --json).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
}

pub fn run(args: GenerateArgs) -> Result<(), String> {
    let cfg = args.engine.to_config()?;
    let params = args.sampling.to_params();
    let engine = EngineHandle::start(cfg).map_err(|e| e.to_string())?;
    let tok = engine.tokenizer().clone();
    let input_ids = if args.chat {
        let text = tok
            .apply_chat_template(&[ChatMessage::new("user", &args.prompt)], true)
            .map_err(|e| e.to_string())?;
        tok.encode(&text, false).map_err(|e| e.to_string())?
    } else {
        tok.encode(&args.prompt, true).map_err(|e| e.to_string())?
    };
    let req = GenerateRequest {
        input_ids: input_ids.clone(),
        params,
        return_logprob: args.json && args.top_logprobs > 0,
        top_logprobs_num: if args.json { args.top_logprobs } else { 0 },
        logprob_start_len: None,
    };
    let mut stream = engine.submit(req).map_err(|e| e.to_string())?;
    let mut out = sglang::engine::Output::default();
    let stdout = std::io::stdout();
    while let Some(ev) = stream.next_blocking() {
        match ev {
            Event::Chunk(c) => {
                if !args.json {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(c.text.as_bytes());
                    let _ = lock.flush();
                }
                out.push(c);
            }
            Event::Finished(f) => {
                out.finish = Some(f);
                break;
            }
            Event::Failed(e) => return Err(e.to_string()),
        }
    }
    let finish = out
        .finish
        .ok_or("the engine stopped before the request finished")?;
    if args.json {
        let matched = match finish.reason.matched() {
            Some(Matched::Token(t)) => serde_json::json!(t),
            Some(Matched::Text(s)) => serde_json::json!(s),
            Some(Matched::Constraint) => serde_json::Value::Null,
            None => serde_json::Value::Null,
        };
        let mut obj = serde_json::json!({
            "text": out.text,
            "output_ids": out.token_ids,
            "finish_reason": finish.reason.as_str(),
            "matched_stop": matched,
            "prompt_ids": input_ids,
            "usage": finish.usage,
        });
        if !out.logprobs.is_empty() {
            obj["logprobs"] = serde_json::to_value(&out.logprobs).unwrap_or_default();
        }
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}
